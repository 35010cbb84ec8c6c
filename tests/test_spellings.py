"""Every spelling of every op, from ONE table, against autograd in float64.

Each row is (registry key, body, spatial dims): the body runs between a conv+ReLU and a global-average-pool +
linear head, and the row must actually put its key into the traced graph. A registry key without a row fails
`test_every_registered_key_has_a_row`, so adding an op is one rule plus one row here.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unroll
from unroll import rules
from unroll.compiler import trace
from unroll.verify import autograd_gradients, relative_error

from conftest import randomize

K = 3
SHAPES = {1: (2, 3, 11), 2: (2, 3, 7, 6), 3: (2, 3, 5, 4, 4)}


class Row(NamedTuple):
    key: Any
    body: Callable[[], nn.Module]  # builds the op under test (fresh parameters per row)
    dims: int = 2
    note: str = ""


class Lambda(nn.Module):
    def __init__(self, fn, **attrs):
        super().__init__()
        self.fn = fn
        for name, value in attrs.items():
            setattr(self, name, value)

    def forward(self, y):
        return self.fn(self, y)


def L(fn, **attrs):
    """A row body: fn(self, y), attrs made fresh on each build (parameters as callables)."""
    return lambda: Lambda(fn, **{k: v() if callable(v) and not isinstance(v, nn.Module) else v
                                 for k, v in attrs.items()})


def P(*shape):
    return lambda: nn.Parameter(torch.randn(*shape, dtype=torch.double) * 0.5)


class Net(nn.Module):
    """conv -> ReLU -> body -> global average pool -> linear; the head is sized to the body's output."""

    def __init__(self, body: nn.Module, dims: int):
        super().__init__()
        self.conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](3, 6, 3, padding=1)
        self.body = body
        self.double()
        with torch.no_grad():
            c = self.body(F.relu(self.conv(torch.zeros(*SHAPES[dims], dtype=torch.double)))).shape[1]
        self.fc = nn.Linear(c, K)

    def forward(self, x):
        return self.fc(self.body(F.relu(self.conv(x))).flatten(2).mean(2))


def shifted(act):
    """An activation on mixed-sign values (the conv's ReLU leaves only non-negative ones)."""
    if isinstance(act, nn.Module):
        return L(lambda s, y: s.act(y - 0.3), act=act)
    return L(lambda s, y: act(y - 0.3))


def conv2d(**kw):
    return (lambda: nn.Conv2d(6, 5, 3, **kw))


ROWS: list[Row] = [
    # linear layers
    Row(nn.Conv1d, (lambda: nn.Conv1d(6, 5, 3, stride=2, padding=2)), 1),
    Row(nn.Conv2d, conv2d(stride=2, padding=2, dilation=2)),
    Row(nn.Conv2d, conv2d(padding=1, padding_mode="reflect"), note="reflect"),
    Row(nn.Conv2d, conv2d(padding=(2, 1), padding_mode="replicate", stride=2), note="replicate"),
    Row(nn.Conv2d, conv2d(padding=1, padding_mode="circular"), note="circular"),
    Row(nn.Conv3d, (lambda: nn.Conv3d(6, 4, 2, padding=1, padding_mode="reflect")), 3),
    Row(F.conv1d, L(lambda s, y: F.conv1d(y, s.w, None, 2, 1), w=P(4, 6, 3)), 1),
    Row(F.conv2d, L(lambda s, y: F.conv2d(y, s.w, padding="same"), w=P(4, 6, 2, 3)), note="same"),
    Row(F.conv2d, L(lambda s, y: F.conv2d(y, s.w, stride=(1, 2), padding=1, groups=2), w=P(4, 3, 3, 2))),
    Row(F.conv3d, L(lambda s, y: F.conv3d(y, s.w, s.b, dilation=1, padding=1), w=P(4, 6, 3, 3, 3), b=P(4)), 3),
    Row(nn.ConvTranspose1d, (lambda: nn.ConvTranspose1d(6, 4, 3, stride=2, padding=1, output_padding=1)), 1),
    Row(nn.ConvTranspose2d, (lambda: nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2, dilation=2))),
    Row(nn.ConvTranspose3d, (lambda: nn.ConvTranspose3d(6, 4, 2, stride=2)), 3),
    Row(F.conv_transpose1d, L(lambda s, y: F.conv_transpose1d(y, s.w, stride=2), w=P(6, 4, 3)), 1),
    Row(F.conv_transpose2d, L(lambda s, y: F.conv_transpose2d(y, s.w, None, 2, 1, 1), w=P(6, 4, 3, 3))),
    Row(F.conv_transpose3d, L(lambda s, y: F.conv_transpose3d(y, s.w, padding=1), w=P(6, 2, 3, 3, 3)), 3),
    Row(nn.Linear, L(lambda s, y: s.lin(y.transpose(1, -1)).transpose(1, -1), lin=nn.Linear(6, 5))),
    Row(F.linear, L(lambda s, y: F.linear(y.transpose(1, 3), s.w, s.b).transpose(1, 3), w=P(5, 6), b=P(5))),
    Row(nn.BatchNorm1d, (lambda: nn.BatchNorm1d(6)), 1),
    Row(nn.BatchNorm2d, (lambda: nn.BatchNorm2d(6))),
    Row(nn.BatchNorm3d, (lambda: nn.BatchNorm3d(6, affine=False)), 3),
    Row(F.batch_norm, L(lambda s, y: F.batch_norm(y, s.bn.running_mean, s.bn.running_var, s.bn.weight, s.bn.bias,
                                                  False, 0.1, 1e-3), bn=nn.BatchNorm2d(6)), note="positional"),
    Row(F.batch_norm, L(lambda s, y: F.batch_norm(y, weight=s.bn.weight, running_var=s.bn.running_var,
                                                  running_mean=s.bn.running_mean, eps=0.1), bn=nn.BatchNorm2d(6)),
        note="keywords, no bias"),
    # activations
    Row(nn.ReLU, shifted(nn.ReLU())),
    Row(F.relu, shifted(lambda z: F.relu(z, inplace=True))),
    Row(torch.relu, shifted(torch.relu)),
    Row(torch.relu_, shifted(torch.relu_)),
    Row("relu", shifted(lambda z: z.relu())),
    Row("relu_", shifted(lambda z: z.relu_())),
    Row(nn.LeakyReLU, shifted(nn.LeakyReLU(0.2))),
    Row(F.leaky_relu, shifted(lambda z: F.leaky_relu(z, 0.3))),
    Row(F.leaky_relu, shifted(lambda z: F.leaky_relu(z, negative_slope=0.05, inplace=True)), note="keywords"),
    Row(F.leaky_relu_, shifted(lambda z: F.leaky_relu_(z, 0.1))),
    Row(nn.Hardtanh, shifted(nn.Hardtanh(-0.2, 0.4))),
    Row(nn.ReLU6, L(lambda s, y: s.act(y * 8.0 - 1.0), act=nn.ReLU6())),
    Row(F.hardtanh, shifted(lambda z: F.hardtanh(z, -0.1, 0.3))),
    Row(F.hardtanh, shifted(lambda z: F.hardtanh(z, max_val=0.2)), note="keywords"),
    Row(F.hardtanh_, shifted(lambda z: F.hardtanh_(z, -0.1, 0.25))),
    Row(F.relu6, L(lambda s, y: F.relu6(y * 8.0 - 1.0))),
    Row(nn.Threshold, shifted(nn.Threshold(0.1, 0.5))),
    Row(F.threshold, shifted(lambda z: F.threshold(z, -0.1, -0.3))),
    Row(F.threshold_, shifted(lambda z: F.threshold_(z, 0.0, 0.2))),
    Row(torch.clamp, shifted(lambda z: torch.clamp(z, -0.1, 0.3))),
    Row(torch.clamp, L(lambda s, y: torch.clamp(y, min=0.0, max=0.2)), note="zeros on the bound"),
    Row("clamp", shifted(lambda z: z.clamp(min=0))),
    Row("clamp_", shifted(lambda z: z.clamp_(-0.2, 0.1))),
    Row(torch.clip, shifted(lambda z: torch.clip(z, max=0.25))),
    Row("clip", shifted(lambda z: z.clip(-0.1))),
    Row("clip_", shifted(lambda z: z.clip_(0.0, 0.3))),
    Row(torch.clamp_min, shifted(lambda z: torch.clamp_min(z, 0.05))),
    Row("clamp_min", shifted(lambda z: z.clamp_min(-0.1))),
    Row("clamp_min_", shifted(lambda z: z.clamp_min_(0.0))),
    Row(torch.clamp_max, shifted(lambda z: torch.clamp_max(z, 0.1))),
    Row("clamp_max", shifted(lambda z: z.clamp_max(0.2))),
    Row("clamp_max_", shifted(lambda z: z.clamp_max_(0.0))),
    # pooling
    Row(nn.MaxPool1d, (lambda: nn.MaxPool1d(3, 2, 1)), 1),
    Row(nn.MaxPool2d, (lambda: nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True))),
    Row(nn.MaxPool3d, (lambda: nn.MaxPool3d(2, ceil_mode=True)), 3),
    Row(F.max_pool1d, L(lambda s, y: F.max_pool1d(y, 2)), 1),
    Row(F.max_pool2d, L(lambda s, y: F.max_pool2d(y, 3, stride=1, padding=1))),
    Row(F.max_pool3d, L(lambda s, y: F.max_pool3d(y, (1, 2, 2), (1, 2, 1))), 3),
    Row(nn.AdaptiveMaxPool1d, (lambda: nn.AdaptiveMaxPool1d(4)), 1),
    Row(nn.AdaptiveMaxPool2d, (lambda: nn.AdaptiveMaxPool2d((3, 4)))),
    Row(nn.AdaptiveMaxPool3d, (lambda: nn.AdaptiveMaxPool3d(2)), 3),
    Row(F.adaptive_max_pool1d, L(lambda s, y: F.adaptive_max_pool1d(y, 3)), 1),
    Row(F.adaptive_max_pool2d, L(lambda s, y: F.adaptive_max_pool2d(y, output_size=(2, 5)))),
    Row(nn.AdaptiveAvgPool1d, (lambda: nn.AdaptiveAvgPool1d(4)), 1),
    Row(nn.AdaptiveAvgPool2d, (lambda: nn.AdaptiveAvgPool2d((5, 4)))),
    Row(F.adaptive_avg_pool1d, L(lambda s, y: F.adaptive_avg_pool1d(y, 7)), 1),
    Row(F.adaptive_avg_pool2d, L(lambda s, y: F.adaptive_avg_pool2d(y, 2))),
    Row(nn.AvgPool1d, (lambda: nn.AvgPool1d(3, 2, 1, ceil_mode=True, count_include_pad=False)), 1),
    Row(nn.AvgPool2d, (lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False))),
    Row(nn.AvgPool3d, (lambda: nn.AvgPool3d(2, 1, 1, divisor_override=3)), 3),
    Row(F.avg_pool1d, L(lambda s, y: F.avg_pool1d(y, 4, padding=2)), 1),
    Row(F.avg_pool2d, L(lambda s, y: F.avg_pool2d(y, 2, divisor_override=5))),
    Row(F.avg_pool3d, L(lambda s, y: F.avg_pool3d(y, 2, ceil_mode=True)), 3),
    Row(torch.mean, L(lambda s, y: torch.mean(y, -1, keepdim=True) * 2.0)),
    Row("mean", L(lambda s, y: y.mean((2,)).unsqueeze(2))),
    Row(torch.sum, L(lambda s, y: torch.sum(y, dim=(-2, 3), keepdim=True))),
    Row("sum", L(lambda s, y: y.sum(2).unsqueeze(-1))),
    # resampling
    Row(nn.Upsample, (lambda: nn.Upsample(scale_factor=2))),
    Row(nn.Upsample, (lambda: nn.Upsample(size=(9, 4), mode="bilinear", align_corners=True)), note="bilinear ac"),
    Row(nn.Upsample, (lambda: nn.UpsamplingBilinear2d(scale_factor=1.5)), note="UpsamplingBilinear2d"),
    Row(nn.Upsample, (lambda: nn.UpsamplingNearest2d(size=11)), note="UpsamplingNearest2d"),
    Row(F.interpolate, L(lambda s, y: F.interpolate(y, scale_factor=(2, 3)))),
    Row(F.interpolate, L(lambda s, y: F.interpolate(y, size=(5, 13), mode="nearest-exact")), note="nearest-exact"),
    Row(F.interpolate, L(lambda s, y: F.interpolate(y, scale_factor=1.7, mode="bilinear", align_corners=False)),
        note="bilinear"),
    Row(F.interpolate, L(lambda s, y: F.interpolate(y, scale_factor=1.7, mode="bilinear",
                                                    recompute_scale_factor=True)), note="recompute"),
    Row(F.interpolate, L(lambda s, y: F.interpolate(y, (11, 3), None, "bicubic", True)), note="bicubic"),
    Row(F.interpolate, L(lambda s, y: F.interpolate(y, size=(4, 3), mode="bilinear", antialias=True)),
        note="antialias"),
    Row(F.interpolate, L(lambda s, y: F.interpolate(y, size=(3, 4), mode="area")), note="area"),
    Row(F.interpolate, L(lambda s, y: F.interpolate(y, scale_factor=2.5, mode="linear")), 1, note="linear"),
    Row(F.interpolate, L(lambda s, y: F.interpolate(y, size=7, mode="linear", align_corners=True)), 1,
        note="linear ac"),
    Row(F.interpolate, L(lambda s, y: F.interpolate(y, scale_factor=2, mode="trilinear")), 3, note="trilinear"),
    Row(F.interpolate, L(lambda s, y: F.interpolate(y, scale_factor=(1, 2, 0.5))), 3, note="nearest 3d"),
    Row(F.interpolate, L(lambda s, y: F.interpolate(y[:, :, ::2], size=y.shape[-2:], mode="bilinear")),
        note="size from a shape"),
    # padding
    Row(F.pad, L(lambda s, y: F.pad(y, (1, 2, -1, 3), value=0.5))),
    Row(F.pad, L(lambda s, y: F.pad(y, [2, 1, 1, 2], mode="reflect")), note="reflect"),
    Row(F.pad, L(lambda s, y: F.pad(y, [y.shape[-1] % 4, 1, 0, y.size(2) // 3])), note="amounts from shapes"),
    Row(F.pad, L(lambda s, y: F.pad(y, (3, 0, 1, 4), "replicate")), note="replicate"),
    Row(F.pad, L(lambda s, y: F.pad(y, (2, 4, 0, 1), mode="circular")), note="circular"),
    Row(F.pad, L(lambda s, y: F.pad(y, (1, 2), mode="reflect")), 1, note="reflect 1d"),
    Row(F.pad, L(lambda s, y: F.pad(y, (1, 0, 2, 1, 1, 1), mode="circular")), 3, note="circular 3d"),
    Row(nn.ZeroPad1d, (lambda: nn.ZeroPad1d((2, -1))), 1),
    Row(nn.ZeroPad2d, (lambda: nn.ZeroPad2d((1, 0, 2, 1)))),
    Row(nn.ZeroPad3d, (lambda: nn.ZeroPad3d(1)), 3),
    Row(nn.ConstantPad1d, (lambda: nn.ConstantPad1d(2, 0.5)), 1),
    Row(nn.ConstantPad2d, (lambda: nn.ConstantPad2d((1, 2, 0, 1), -1.0))),
    Row(nn.ConstantPad3d, (lambda: nn.ConstantPad3d((0, 1, 1, 0, 2, 1), 2.0)), 3),
    Row(nn.ReflectionPad1d, (lambda: nn.ReflectionPad1d((3, 1))), 1),
    Row(nn.ReflectionPad2d, (lambda: nn.ReflectionPad2d((1, 2, 3, 1)))),
    Row(nn.ReflectionPad3d, (lambda: nn.ReflectionPad3d(1)), 3),
    Row(nn.ReplicationPad1d, (lambda: nn.ReplicationPad1d((0, 4))), 1),
    Row(nn.ReplicationPad2d, (lambda: nn.ReplicationPad2d(2))),
    Row(nn.ReplicationPad3d, (lambda: nn.ReplicationPad3d((1, 0, 2, 1, 0, 3))), 3),
    Row(nn.CircularPad1d, (lambda: nn.CircularPad1d((4, 2))), 1),
    Row(nn.CircularPad2d, (lambda: nn.CircularPad2d((1, 3, 2, 0)))),
    Row(nn.CircularPad3d, (lambda: nn.CircularPad3d(1)), 3),
    # regularisers and identities (eval mode: the identity; train mode is tests/test_rules.py)
    Row(nn.Dropout, (lambda: nn.Dropout(0.4))),
    Row(nn.Dropout1d, (lambda: nn.Dropout1d(0.4)), 1),
    Row(nn.Dropout2d, (lambda: nn.Dropout2d(0.4))),
    Row(nn.Dropout3d, (lambda: nn.Dropout3d(0.4)), 3),
    Row(nn.AlphaDropout, (lambda: nn.AlphaDropout(0.4))),
    Row(F.dropout, L(lambda s, y: F.dropout(y, 0.3, training=False))),
    Row(torch.dropout, L(lambda s, y: torch.dropout(y, 0.3, False))),
    Row(F.dropout1d, L(lambda s, y: F.dropout1d(y, 0.3, training=False)), 1),
    Row(F.dropout2d, L(lambda s, y: F.dropout2d(y, training=False))),
    Row(F.dropout3d, L(lambda s, y: F.dropout3d(y, 0.1, False)), 3),
    Row(F.alpha_dropout, L(lambda s, y: F.alpha_dropout(y, 0.2))),
    Row(F.feature_alpha_dropout, L(lambda s, y: F.feature_alpha_dropout(y, 0.2, training=False))),
    Row(nn.Identity, (lambda: nn.Identity())),
    Row("contiguous", L(lambda s, y: y.transpose(2, 3).contiguous())),
    Row("clone", L(lambda s, y: y.clone())),
    Row(torch.clone, L(lambda s, y: torch.clone(y))),
    # arithmetic: fan-out, alpha, constants (numbers, parameters, batch-shaped masks)
    Row(operator.add, L(lambda s, y: y + y[:, :1] + 1.0)),
    Row(operator.add, L(lambda s, y: _iadd(y)), note="+= is operator.add"),
    Row(torch.add, L(lambda s, y: torch.add(y, y[:, 1:2], alpha=2))),
    Row("add", L(lambda s, y: y.add(y[:, :, :1], alpha=-0.5))),
    Row("add_", L(lambda s, y: (y * 1.0).add_(y[:, 2:3]))),
    Row(operator.sub, L(lambda s, y: y - y.mean(1, keepdim=True) - 2.0)),
    Row(torch.sub, L(lambda s, y: torch.sub(y[:, :1], y, alpha=3))),
    Row("sub", L(lambda s, y: y.sub(y[:, 1:2], alpha=0.25))),
    Row("sub_", L(lambda s, y: (y * 1.0).sub_(y[:, :1], alpha=2))),
    Row(operator.neg, L(lambda s, y: -y)),
    Row(torch.neg, L(lambda s, y: torch.neg(y))),
    Row("neg", L(lambda s, y: y.neg())),
    Row(operator.mul, L(lambda s, y: y * s.w * 3.0, w=P(1, 6, 1, 1))),
    Row(operator.mul, L(lambda s, y: y * (y > 0.1).float()), note="batch-shaped mask"),
    Row(operator.mul, L(lambda s, y: (y[:, :1] < 0.2).to(y.dtype) * y), note="mask on the left, broadcast"),
    Row(torch.mul, L(lambda s, y: torch.mul(s.w, y), w=P(6, 1, 6))),
    Row("mul", L(lambda s, y: y.mul(0.5).mul(s.w), w=P(1, 1, 1))),
    Row("mul_", L(lambda s, y: (y * 1.0).mul_((y > 0.2).double()))),
    Row(operator.truediv, L(lambda s, y: y / (s.w.abs() + 1.0) / 2.0, w=P(6, 1, 1))),
    Row(torch.div, L(lambda s, y: torch.div(y, 4.0))),
    Row("div", L(lambda s, y: y.div((y > 0.3).double() + 1.0))),
    Row("div_", L(lambda s, y: (y * 1.0).div_(3.0))),
    Row(torch.where, L(lambda s, y: torch.where(y > 0.2, y, y[:, :1] * 2.0))),
    Row(torch.where, L(lambda s, y: torch.where(s.m, y, 0.5), m=lambda: torch.rand(7, 1) > 0.5), note="buffer mask"),
    Row("where", L(lambda s, y: y.where(y[:, 1:2] < 0.3, -y))),
    Row("float", L(lambda s, y: y.float().double())),  # float32 round trip: see test_rules for its tolerance
    Row("double", L(lambda s, y: y.double())),
    Row("half", L(lambda s, y: y.half().double())),
    Row("bfloat16", L(lambda s, y: y.bfloat16().double())),
    Row("to", L(lambda s, y: y.to(torch.float64))),
    Row("to", L(lambda s, y: y.to("cpu", dtype=torch.float64)), note="device and dtype"),
    Row("type_as", L(lambda s, y: y.type_as(s.w) * s.w, w=P(1))),
    Row("type", L(lambda s, y: y + y.type(torch.float64)), note="a cast beside a path (was cut: 'type' counted as "
        "a string query)"),
    Row("type", L(lambda s, y: y.type("torch.DoubleTensor") * 2.0), note="the string form"),
    # shape ops
    Row(torch.flatten, L(lambda s, y: torch.flatten(y, 2).unsqueeze(-1))),
    Row("flatten", L(lambda s, y: y.flatten(start_dim=1).view(y.shape[0], 6, -1))),
    Row("view", L(lambda s, y: y.view(y.size(0), 2, -1))),
    Row("reshape", L(lambda s, y: y.reshape((y.shape[0], 3, -1)))),
    Row(torch.reshape, L(lambda s, y: torch.reshape(y, (-1, 12, 21)))),
    Row(nn.Flatten, L(lambda s, y: s.f(y).unsqueeze(1), f=nn.Flatten())),
    Row("view_as", L(lambda s, y: y.transpose(2, 3).reshape(y.shape[0], 6, -1).view_as(y))),
    Row("reshape_as", L(lambda s, y: y.flatten(1).reshape_as(y))),
    Row(torch.squeeze, L(lambda s, y: torch.squeeze(y[:, :, :1], 2))),
    Row("squeeze", L(lambda s, y: y[:, :, 2:3].squeeze(-2))),
    Row(torch.unsqueeze, L(lambda s, y: torch.unsqueeze(y, -1))),
    Row("unsqueeze", L(lambda s, y: y.unsqueeze(dim=2))),
    Row(torch.unflatten, L(lambda s, y: torch.unflatten(y, 1, (2, 3)))),
    Row("unflatten", L(lambda s, y: y.flatten(2).unflatten(-1, (6, 7)))),
    Row(nn.Unflatten, L(lambda s, y: s.u(y.flatten(1)), u=nn.Unflatten(1, (6, 42)))),
    Row("expand", L(lambda s, y: y[:, :, :1].expand(-1, -1, 4, 6))),
    Row("expand_as", L(lambda s, y: y.mean(1, keepdim=True).expand_as(y))),
    Row("repeat", L(lambda s, y: y.repeat(1, 2, 1, 3))),
    Row(torch.tile, L(lambda s, y: torch.tile(y, (1, 2, 1)))),
    Row("tile", L(lambda s, y: y.tile((1, 1, 2, 1)))),
    Row(torch.transpose, L(lambda s, y: torch.transpose(y, 1, -1))),
    Row("transpose", L(lambda s, y: y.transpose(-1, -2))),
    Row("transpose_", L(lambda s, y: (y * 1.0).transpose_(2, 3))),
    Row(torch.swapaxes, L(lambda s, y: torch.swapaxes(y, 1, 2))),
    Row("swapaxes", L(lambda s, y: y.swapaxes(-1, 1))),
    Row(torch.swapdims, L(lambda s, y: torch.swapdims(y, 3, 1))),
    Row("swapdims", L(lambda s, y: y.swapdims(1, -2))),
    Row(torch.flip, L(lambda s, y: torch.flip(y, (1, -1)) * s.w, w=P(1, 6, 1, 6))),
    Row("flip", L(lambda s, y: y.flip(2) * s.w, w=P(1, 1, 7, 1))),
    Row("flip", L(lambda s, y: y.flip(1, 3) * s.w, w=P(1, 6, 1, 6)), note="varargs"),
    Row(torch.roll, L(lambda s, y: torch.roll(y, (1, -2), (1, 3)) * s.w, w=P(1, 6, 1, 6))),
    Row("roll", L(lambda s, y: y.roll(3, -2) * s.w, w=P(1, 1, 7, 1))),
    Row(torch.movedim, L(lambda s, y: torch.movedim(y, 1, -1))),
    Row("movedim", L(lambda s, y: y.movedim((2, 3), (3, 1)))),
    Row(torch.moveaxis, L(lambda s, y: torch.moveaxis(y, -1, 1))),
    Row("moveaxis", L(lambda s, y: y.moveaxis(2, 1))),
    Row(torch.narrow, L(lambda s, y: torch.narrow(y, 1, 2, 3))),
    Row("narrow", L(lambda s, y: y.narrow(-1, -4, 2))),
    Row(torch.permute, L(lambda s, y: torch.permute(y, (0, 3, 1, 2)))),
    Row("permute", L(lambda s, y: y.permute(0, 2, 3, 1).relu().permute(0, -1, 1, 2))),
    Row(torch.cat, L(lambda s, y: torch.cat([y, y[:, :2] * 2.0], dim=1))),
    Row(torch.concat, L(lambda s, y: torch.concat((y[:, :, 1:], y), -2))),
    Row(torch.concatenate, L(lambda s, y: torch.concatenate([y, y], 1))),
    Row(torch.stack, L(lambda s, y: torch.stack([y, y * 2.0], dim=-1).flatten(-2))),
    Row(torch.stack, L(lambda s, y: torch.stack((y[:, 0], y[:, 3]), 1)), note="the channel dim"),
    Row(torch.chunk, L(lambda s, y: torch.chunk(y, 3, 1)[-1] * 2.0)),
    Row("chunk", L(lambda s, y: _swap_halves(y))),
    Row(torch.split, L(lambda s, y: torch.split(y, [2, 4], 1)[1])),
    Row("split", L(lambda s, y: _res2net(y))),
    Row(torch.tensor_split, L(lambda s, y: torch.tensor_split(y, 3, dim=2)[0])),
    Row("tensor_split", L(lambda s, y: y.tensor_split([1, 4], 1)[-2])),
    Row(torch.unbind, L(lambda s, y: torch.unbind(y, 1)[-1].unsqueeze(1))),
    Row("unbind", L(lambda s, y: torch.stack([y.unbind(-1)[0], y.unbind(-1)[-1]], -1))),
    Row(operator.getitem, L(lambda s, y: y[:, 1:5, 1:-1, ::2])),
    Row(operator.getitem, L(lambda s, y: y[:, [0, 0, 5]]), note="repeated indices"),
    Row(operator.getitem, L(lambda s, y: y[..., None, 1:, [2, 2]]), note="ellipsis, None"),
]


def _swap_halves(y):
    a, b = y.chunk(2, dim=-1)
    return torch.cat([b, a * 2.0], -1)


def _iadd(y):
    z = y * 1.0
    z += y[:, :1]
    return z


def _res2net(y):
    """timm's Bottle2neck: parts by index, the last (spx[-1]) passed through unchanged."""
    spx = y.split(2, 1)
    out = [F.relu(spx[0])]
    out.append(F.relu(out[-1] + spx[1]))
    out.append(spx[-1])
    return torch.cat(out, 1)


def spelling(key) -> str:
    if isinstance(key, str):
        return f"Tensor.{key}"
    if isinstance(key, type):
        return f"nn.{key.__name__}"
    return f"{getattr(key, '__module__', None) or 'torch'}.{getattr(key, '__name__', key)}"


def row_id(row: Row) -> str:
    return spelling(row.key) + (f"[{row.note}]" if row.note else "")


def registered_keys() -> list:
    return list(rules.RULES)


def graph_keys(model: nn.Module) -> set:
    """The registry keys a model's traced graph uses: module classes, functions, method names."""
    keys = set()
    for node in trace(model).nodes:
        if node.op == "call_module":  # the class and its bases (rules are looked up along the MRO)
            keys.update(type(model.get_submodule(node.target)).__mro__)
        elif node.op in ("call_function", "call_method"):
            keys.add(node.target)
    return keys


def test_every_registered_key_has_a_row():
    covered = {row.key for row in ROWS}
    missing = [spelling(k) for k in registered_keys() if k not in covered]
    assert not missing, f"registered rule keys without a row in ROWS: {missing}"
    stale = [row_id(r) for r in ROWS if r.key not in rules.RULES]
    assert not stale, f"rows for keys no rule is registered under: {stale}"


def test_inplace_operators_are_traced_as_plain_ones():
    """Why no rule is registered for operator.iadd and friends: fx records `z += y` as operator.add (a Proxy has
    no __iadd__), and `z *= c` as operator.mul."""
    def body(s, y):
        z = y * 1.0
        z += y
        z -= y[:, :1]
        z *= 2.0
        z /= 3.0
        return z
    keys = graph_keys(Net(Lambda(body), 2))
    assert not keys & {operator.iadd, operator.isub, operator.imul, operator.itruediv}
    assert {operator.add, operator.sub, operator.mul, operator.truediv} <= keys


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("row", ROWS, ids=[row_id(r) for r in ROWS])
def test_spelling_matches_autograd(row: Row):
    torch.manual_seed(0)
    model = randomize(Net(row.body(), row.dims))
    assert row.key in graph_keys(model), f"the row does not use {spelling(row.key)}"
    x = torch.randn(*SHAPES[row.dims], dtype=torch.double)
    net = unroll.compile(model)
    out = net(x)
    ref_grads, ref_logits = autograd_gradients(model, x, create_graph=True)
    ref_heat = (ref_grads * x.unsqueeze(1)).sum(2)
    assert ref_heat.abs().max() > 0
    assert relative_error(out.logits, ref_logits) < 1e-12
    assert relative_error(out.heatmaps, ref_heat) < 1e-10
    assert relative_error(net.gradients(x), ref_grads) < 1e-10
    # a heatmap loss trains the weights: the decoder's parameter gradients equal double backprop's
    params = [p for p in model.parameters()]
    w = torch.randn_like(ref_heat)
    ref = torch.autograd.grad((ref_heat * w).sum(), params, allow_unused=True)
    ours = torch.autograd.grad((out.heatmaps * w).sum(), params, allow_unused=True)
    for r, o in zip(ref, ours):
        if r is None or r.abs().max() == 0:
            assert o is None or o.abs().max() < 1e-12
        else:
            assert relative_error(o, r) < 1e-9
