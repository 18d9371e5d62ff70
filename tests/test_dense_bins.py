"""The bins head's decode and gradient by hand (probe/dense/bins.py) and its bf16 GEMMs
(probe/dense/precision.py): the same numbers as autograd through DINOv2's decode, block by block,
and a bf16 step close to the float32 one."""

from __future__ import annotations

import pytest
import torch

from featstore.errors import UsageError
from probe.dense import bins as bins_decode
from probe.dense.heads import DenseHeads, DenseSpec
from probe.dense.precision import cpu_multiplies_bf16, matmul_dtype
from probe.protocol import Protocol
from tests.helpers import autograd_step


def _heads(dtype=torch.float64, matmul=None, outputs=16, cls=5):
    spec = DenseSpec("depth", "bins", outputs, 1e-3, 8.0, (24, 20))
    heads = DenseHeads(spec, 12, cls, [1e-3, 1e-2, 1e-1], [0.0, 1e-4, 0.0], dtype=dtype, matmul_dtype=matmul)
    heads.w.copy_(torch.randn(heads.w.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype) * 0.3)
    return heads


@pytest.fixture
def threads(request):
    """torch's intra-op threads for one test: 1 decodes inline, 2 splits the images between two workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("block_bytes", [1 << 19, 4 * 48 * 7, 1])  # one block per image; 7 tokens; one token
@pytest.mark.parametrize("with_cls", [True, False])
def test_decode_and_gradient_equal_autograd_block_by_block(monkeypatch, block_bytes, with_cls, threads):
    monkeypatch.setattr(bins_decode, "BLOCK_BYTES", block_bytes)
    torch.manual_seed(2)
    heads = _heads(cls=5 if with_cls else 0)
    patches = torch.randn(3, 6, 5, 12, dtype=torch.float64)
    cls = torch.randn(3, 5, dtype=torch.float64) if with_cls else None
    grad = torch.randn(3, 3, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        depth, saved = heads._bins_forward(patches, cls)
        gw, gb = heads._bins_gradients(saved, cls, grad)
    heads.w.requires_grad_(True)
    heads.b.requires_grad_(True)
    ref = heads.decode(heads.token_outputs(patches, cls))
    rgw, rgb = torch.autograd.grad(ref, [heads.w, heads.b], grad_outputs=grad)
    torch.testing.assert_close(depth, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rgw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, rgb, rtol=1e-10, atol=1e-12)
    assert (saved[1] == 0).any() and (saved[1] == 1).any()  # some ReLUs closed, some open: the mask was exercised


def test_bf16_gemms_step_close_to_float32():
    """256 bins, 13 heads: the bf16 step's losses and weight updates within bf16's rounding of the float32 step's."""
    torch.manual_seed(3)
    spec = DenseSpec("depth", "bins", 256, 1e-3, 10.0, (32, 32))
    lrs = [10 ** (-4 + i / 4) for i in range(13)]
    a = DenseHeads(spec, 64, 64, lrs, [0.0] * 13)
    b = DenseHeads(spec, 64, 64, lrs, [0.0] * 13, matmul_dtype=torch.bfloat16)
    w0 = torch.randn_like(a.w) * 0.05
    a.w.copy_(w0)
    b.w.copy_(w0)
    patches, cls = torch.randn(4, 8, 8, 64), torch.randn(4, 64)
    target = torch.rand(4, 32, 32) * 9 + 0.5
    protocol = Protocol(lr_grid=lrs, epochs=1, batch_size=4)
    la = a.train_step(patches, cls, target, protocol, 1.0)
    lb = b.train_step(patches, cls, target, protocol, 1.0)
    torch.testing.assert_close(lb, la, rtol=5e-3, atol=0)
    da, db = a.w - w0, b.w - w0
    assert float((db - da).norm() / da.norm()) < 0.02  # the update's direction and size agree to 2%
    assert float((b.b - a.b).norm() / (a.b - 1).norm()) < 0.02


def test_precision_choice():
    cpu = torch.device("cpu")
    assert matmul_dtype("fp32", cpu) == torch.float32
    assert matmul_dtype("bf16", cpu) == torch.bfloat16
    assert matmul_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert matmul_dtype("auto", cpu) == (torch.bfloat16 if cpu_multiplies_bf16() else torch.float32)
    with pytest.raises(UsageError, match="--precision"):
        matmul_dtype("fp8", cpu)


def test_the_log_linear_head_keeps_float32_gemms():
    spec = DenseSpec("depth", "linear", 1, 1e-3, 8.0, (24, 20), 0.5)
    assert DenseHeads(spec, 12, 5, [1e-3], [0.0], matmul_dtype=torch.bfloat16).matmul_dtype == torch.float32
    assert _heads(torch.float32, torch.bfloat16).matmul_dtype == torch.bfloat16


def test_seg_step_equals_autograd_through_the_cross_entropy():
    """The seg head's closed-form cross-entropy gradient: the same losses and weights after one step as
    autograd through ``losses`` (ignored pixels included), and a diverged head that does not move."""
    torch.manual_seed(4)
    spec = DenseSpec("seg", "seg", 5, loss_size=(24, 20))
    lrs = [1e-2, 1e-1, 1.0]
    a = DenseHeads(spec, 12, 5, lrs, [0.0, 1e-4, 0.0], dtype=torch.float64)
    b = DenseHeads(spec, 12, 5, lrs, [0.0, 1e-4, 0.0], dtype=torch.float64)
    w0 = torch.randn_like(a.w) * 0.3
    w0[:, 10:15] = float("nan")  # head 2 diverged
    a.w.copy_(w0)
    b.w.copy_(w0)
    patches, cls = torch.randn(3, 6, 5, 12, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    target = torch.randint(0, 5, (3, 24, 20)).to(torch.uint8)
    target[:, :4] = 255
    protocol = Protocol(lr_grid=lrs, epochs=1, batch_size=3)
    got = a.train_step(patches, cls, target, protocol, 1.0)
    loss = autograd_step(b, patches, cls, target, protocol)
    torch.testing.assert_close(got[:2], loss[:2])
    assert not torch.isfinite(got[2])
    torch.testing.assert_close(a.w[:, :10], b.w[:, :10])
    torch.testing.assert_close(a.b[:10], b.b[:10])
    assert not torch.equal(a.w[:, :5], w0[:, :5])
