"""The performance paths give the same numbers: class chunks, decoder checkpointing, channels_last, bf16 autocast,
torch.compile of the unrolled module."""
import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm

import unroll
from unroll.verify import relative_error

from conftest import randomize


@pytest.fixture(scope="module")
def resnet():
    return randomize(tvm.resnet18(num_classes=7))


def loss_and_grads(net, model, x, mask):
    out = net(x)
    loss = F.cross_entropy(out.heatmaps, mask) + out.logits.square().mean()
    return out, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def test_chunks_and_checkpoint_are_exact(resnet):
    x = torch.randn(2, 3, 45, 37, dtype=torch.double)
    mask = torch.randint(0, 7, (2, 45, 37))
    ref, ref_grads = loss_and_grads(unroll.compile(resnet, classes_per_chunk=None), resnet, x, mask)
    for kw in ({"classes_per_chunk": 3}, {"checkpoint": True}, {"classes_per_chunk": 2, "checkpoint": True},
               {"classes_per_chunk": "auto"}):
        out, grads = loss_and_grads(unroll.compile(resnet, **kw), resnet, x, mask)
        assert relative_error(out.heatmaps, ref.heatmaps) < 1e-12, kw
        for g, r in zip(grads, ref_grads):
            if r is not None:
                assert relative_error(g, r) < 1e-10, kw


def test_auto_chunks_on_the_cpu(resnet, monkeypatch):
    """"auto": as many classes per pass as keep the largest decoder tensor under AUTO_CHUNK_BYTES -- resnet18 at
    224 px, batch 2: the stem's 64x112x112 activations are 6.4 MB per class in float32, so 3 classes per pass."""
    from unroll.compiler import auto_chunk

    import copy

    net = unroll.compile(copy.deepcopy(resnet).float())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits, saved = net.encode(x)
        seed = net.seed(logits)
        assert auto_chunk(seed, saved) == 3
        assert auto_chunk(seed.double(), saved) == 1  # (8-byte elements)
        one = tuple(s[:1] if torch.is_tensor(s) else s for s in saved)  # batch 1: 3.2 MB per class -> 7
        assert auto_chunk(seed[:1], one) == 7
        calls = []
        monkeypatch.setattr(net, "_run", lambda dec, part, sv: calls.append(part.shape[1]) or dec(part, *sv))
        net.decode(logits, saved)
    assert calls == [3, 3, 1]  # the fixture's 7 classes, 3 per pass


def test_classes_per_chunk_is_checked(resnet):
    for bad in (0, -2, "all", 1.5):
        with pytest.raises(ValueError, match="classes_per_chunk"):
            unroll.compile(resnet, classes_per_chunk=bad)


def test_channels_last(resnet):
    import copy

    x = torch.randn(2, 3, 45, 37, dtype=torch.double)
    ref = unroll.compile(resnet)(x).heatmaps
    model = copy.deepcopy(resnet).to(memory_format=torch.channels_last)
    ours = unroll.compile(model)(x.contiguous(memory_format=torch.channels_last)).heatmaps
    assert relative_error(ours, ref) < 1e-10


def test_bf16_autocast_on_cpu():
    """Under bf16 autocast the heatmaps match autograd's own bf16 input x gradient (8-bit mantissa: both are ~0.3
    max-relative / 0.978 cosine away from float32 on this untrained net, the same amount)."""
    from unroll.verify import autograd_heatmaps

    model = tvm.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 48)
    net = unroll.compile(model)
    with torch.no_grad():
        ref = net(x).heatmaps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            out = net(x)
        auto, _ = autograd_heatmaps(model, x)
    ours, auto = out.heatmaps.float(), auto.float()
    assert relative_error(ours, auto) < 0.05
    assert F.cosine_similarity(ours.flatten(), auto.flatten(), dim=0) > 0.999
    assert F.cosine_similarity(ours.flatten(), ref.flatten(), dim=0) > 0.95


@pytest.mark.slow
def test_torch_compile_of_unrolled_resnet18():
    model = tvm.resnet18(num_classes=5).eval()
    net = unroll.compile(model)
    compiled = torch.compile(net)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ref = net(x)
        out = compiled(x)
    assert relative_error(out.logits, ref.logits) < 1e-4
    assert relative_error(out.heatmaps, ref.heatmaps) < 1e-4
