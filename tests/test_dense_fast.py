"""Dense probes' speed and memory (#24 follow-up): the closed-form SigLoss gradient is autograd's, and a
streamed run's peak memory does not grow with the number of images beyond a documented bound."""

from __future__ import annotations

import pytest
import torch

from probe.dense.heads import DenseHeads, DenseSpec, sig_loss, sig_loss_and_grad, upsample, upsample_transpose
from tests.helpers import autograd_step


def test_upsample_transpose_is_the_adjoint_of_upsample():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    y = torch.randn(2, 3, 20, 16, dtype=torch.float64)
    assert float((upsample(x, (20, 16)) * y).sum()) == pytest.approx(float((x * upsample_transpose(y, (5, 4))).sum()), rel=1e-12)


def test_sig_loss_and_grad_match_autograd():
    torch.manual_seed(0)
    target = torch.rand(3, 6, 7, dtype=torch.float64) * 5
    target[target < 1] = 0
    pred = (torch.rand(3, 4, 6, 7, dtype=torch.float64) * 6 + 0.5).requires_grad_(True)
    loss, grad = sig_loss_and_grad(pred.detach().clone(), target)
    ref = sig_loss(pred, target)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, torch.autograd.grad(ref.sum(), pred)[0])


@pytest.mark.parametrize("head", ["linear", "bins"])
def test_depth_train_step_equals_autograd_through_the_loss(head):
    """One step of every head: the same losses and the same weights as autograd through ``losses``
    (the implementation before the closed form), including a diverged head that must not move."""
    torch.manual_seed(1)
    spec = DenseSpec("depth", head, 16 if head == "bins" else 1, 1e-3, 8.0, (24, 20), 0.5 if head == "linear" else None)
    lrs = [1e-3, 1e-2, 1e-1]
    a = DenseHeads(spec, 12, 5, lrs, [0.0, 1e-4, 0.0], dtype=torch.float64)
    b = DenseHeads(spec, 12, 5, lrs, [0.0, 1e-4, 0.0], dtype=torch.float64)
    w0 = torch.randn_like(a.w) * 0.1
    a.w.copy_(w0)
    b.w.copy_(w0)
    a.w[:, 2 * spec.outputs : 3 * spec.outputs] = float("nan")  # head 2 diverged
    b.w.copy_(a.w)
    patches, cls = torch.randn(4, 6, 5, 12, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    target = torch.rand(4, 24, 20, dtype=torch.float64) * 7
    target[target < 1] = 0
    from probe.protocol import Protocol

    protocol = Protocol(lr_grid=lrs, epochs=1, batch_size=4)
    got = a.train_step(patches, cls, target, protocol, 1.0)
    loss = autograd_step(b, patches, cls, target, protocol)
    torch.testing.assert_close(got[:2], loss.detach()[:2])
    assert not torch.isfinite(got[2])
    k = spec.outputs
    torch.testing.assert_close(a.w[:, : 2 * k], b.w[:, : 2 * k])
    torch.testing.assert_close(a.b[: 2 * k], b.b[: 2 * k])
    assert not bool(a.finite()[2])  # the diverged head stays diverged (its weights are NaN), it is never selected
    assert not torch.equal(a.w[:, :k], w0[:, :k])  # the step moved the finite heads


def test_batched_confusions_equal_one_image_at_a_time():
    import numpy as np

    from probe.dense import metrics

    rng = np.random.default_rng(3)
    gt = rng.integers(0, 5, (3, 9, 8)).astype(np.uint8)
    gt[:, :2] = 255
    pred = rng.integers(0, 5, (3, 4, 9, 8)).astype(np.uint8)
    got = metrics.confusions(pred, gt, 5)
    for i in range(3):
        for h in range(4):
            np.testing.assert_array_equal(got[i, h], metrics.confusion(pred[i, h], gt[i], 5))
    per = metrics.seg_per_image_from_confusion(got[:, 1])
    direct = metrics.seg_per_image(pred[:, 1], gt, 5)
    np.testing.assert_allclose(per["miou"], direct["miou"])
    np.testing.assert_allclose(per["pixel_acc"], direct["pixel_acc"])


# ---------------------------------------------------------------- peak memory as N grows

_RSS_CHILD = """
import sys, resource
from pathlib import Path
import numpy as np, torch
from featstore.store import FeatureStore, write_split_targets
from probe.dense.fit import fit_dense
from probe.protocol import Protocol

def make(path, n, grid=16, c=384, size=64):
    rng = np.random.default_rng(0)
    sizes = {"train": n, "val": n // 4, "test": n // 4}
    store = FeatureStore.create(path, splits={s: ([f"{s}/{i}.png" for i in range(k)], np.zeros(k)) for s, k in sizes.items()},
                                views={"patch": (grid, grid, c), "cls": c}, chunk_rows=32)
    direction = rng.standard_normal(c) / np.sqrt(c)
    for split, k in sizes.items():
        for unit in store.units(split):
            tokens = rng.standard_normal((unit.rows, grid, grid, c)).astype(np.float16)
            store.write_unit(unit, {"patch": tokens, "cls": tokens.mean(axis=(1, 2))}, np.ones(unit.rows, bool))
        depth = np.exp(1 + rng.random((k, size, size), np.float32))
        write_split_targets(store, split, {"depth": depth}, np.ones(k, bool))
    store.update_attrs({"targets": {"kinds": ["depth"], "size": [size, size], "files_sha256": "synthetic", "invalid": {}}})
    store.finalize()

if sys.argv[1] == "make":
    make(Path(sys.argv[2]), int(sys.argv[3]))
else:
    fit_dense([sys.argv[2]], Protocol(lr_grid=[1e-3], epochs=1, batch_size=16), "depth", head="linear",
              out=Path(sys.argv[2]).parent / "run", device="cpu", max_memory=64 << 20, save_predictions=True)
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(hwm / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

# A streamed run holds one block of tokens (--max-memory), one evaluation batch, and its O(N) state:
# the train targets at the loss resolution (16 KiB an image at 64×64 float32) and a few numbers per
# image. Doubling N from 400 to 800 images adds 400 × 384 KiB = 150 MiB of float32 train tokens
# (300 MiB with val and test), which must not show: the growth allowed is the O(N) state added
# (6.25 MiB) plus 10 MiB for the allocator. Measured: +9 MiB; before the fixes, +26 MiB here (and
# ~0.2 MiB per image at 250-1,000 images, benchmarks/RESULTS.md).
TARGET_BYTES_PER_IMAGE = 64 * 64 * 4
RSS_SLACK_MIB = 10.0


@pytest.mark.slow
def test_streamed_peak_memory_does_not_grow_with_n(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    peaks = {}
    for n in (400, 800):
        store = tmp_path / f"s{n}" / "s.zarr"
        subprocess.run([sys.executable, "-c", _RSS_CHILD, "make", str(store), str(n)], check=True, env=env)
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, "fit", str(store)], check=True, env=env, capture_output=True, text=True)
        hwm, maxrss = (float(x) for x in out.stdout.split()[-2:])
        assert maxrss >= hwm * 0.99  # ru_maxrss also counts the parent's peak (Linux keeps it across exec): VmHWM is the child's own
        peaks[n] = hwm
        assert (tmp_path / f"s{n}" / "run" / "predictions").is_dir()
    added_tokens_mib = 400 * 16 * 16 * 384 * 4 / 2**20
    growth = peaks[800] - peaks[400]
    print(f"peak RSS {peaks} MiB: +{growth:.0f} MiB for +{added_tokens_mib:.0f} MiB of train tokens")
    assert growth < 400 * TARGET_BYTES_PER_IMAGE / 2**20 + RSS_SLACK_MIB, peaks


def test_transposed_upsampling_and_its_adjoint():
    from probe.dense.heads import upsample_transposed, upsample_transposed_adjoint

    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    y = torch.randn(2, 3, 16, 20, dtype=torch.float64)  # (W, H) layout of a 20×16 output
    torch.testing.assert_close(upsample_transposed(x, (20, 16)), upsample(x, (20, 16)).transpose(-1, -2))
    torch.testing.assert_close(upsample_transposed_adjoint(y, (5, 4)), upsample_transpose(y.transpose(-1, -2).contiguous(), (5, 4)))
