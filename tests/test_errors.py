"""Models unroll cannot compile exactly must fail loudly, naming the node, op, module path and what to do."""
import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

import unroll
from unroll import UnsupportedModelError


def test_efficientnet_names_silu_sigmoid_and_where():
    with pytest.raises(UnsupportedModelError) as e:
        unroll.compile(tvm.efficientnet_b0(num_classes=4))
    msg = str(e.value)
    assert "SiLU" in msg and "Sigmoid" in msg
    assert "features.0.2" in msg  # the module path
    assert "efficientnet.py" in msg  # the source file of the offending call
    assert "Replace these ops" in msg


def test_vit_names_attention_gelu_layernorm():
    with pytest.raises(UnsupportedModelError) as e:
        unroll.compile(tvm.vit_b_16(num_classes=4))
    msg = str(e.value)
    for op in ("MultiheadAttention", "GELU", "LayerNorm"):
        assert op in msg


class ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.fc(self.conv(x).mean((2, 3)))


def test_data_dependent_control_flow():
    with pytest.raises(UnsupportedModelError, match="control flow"):
        unroll.compile(ControlFlow())


class TwoOutputs(ControlFlow):
    def forward(self, x):
        f = self.conv(x).mean((2, 3))
        return self.fc(f), f


def test_tuple_output():
    with pytest.raises(UnsupportedModelError, match=r"one \(B, K\) tensor"):
        unroll.compile(TwoOutputs())


class Gated(ControlFlow):
    def forward(self, x):
        y = self.conv(x)
        return self.fc((y * torch.relu(y)).mean((2, 3)))


def test_product_of_activations():
    with pytest.raises(UnsupportedModelError, match="product of two input-dependent tensors"):
        unroll.compile(Gated())


class TwoInputs(ControlFlow):
    def forward(self, x, y):
        return self.fc(self.conv(x + y).mean((2, 3)))


def test_two_inputs():
    with pytest.raises(UnsupportedModelError, match="one input tensor"):
        unroll.compile(TwoInputs())


class SpatialOutput(ControlFlow):
    def forward(self, x):
        return self.conv(x)  # (B, K, H, W): a segmentation net, not a classifier


def test_output_must_be_batch_by_classes():
    net = unroll.compile(SpatialOutput())
    with pytest.raises(UnsupportedModelError, match=r"needs \(B, K\) logits"):
        net(torch.randn(1, 3, 8, 8))


class MixesBatch(ControlFlow):
    def forward(self, x):
        y = self.conv(x).reshape(-1, 4)  # (B*H*W, C): samples mixed with pixels
        return self.fc(y).reshape(x.shape[0], -1, 2).mean(1)


def test_reshape_that_mixes_the_batch():
    net = unroll.compile(MixesBatch())
    with pytest.raises(RuntimeError, match="batch"):
        net(torch.randn(2, 3, 6, 6))


def test_bad_rule_name():
    with pytest.raises(ValueError, match="rule="):
        unroll.compile(tvm.resnet18(), rule="lrp-zplus")
