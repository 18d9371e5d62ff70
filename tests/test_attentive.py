"""The attentive probe (#25 item 1): a cross-attention pooler over cached patch tokens.

The batched head equals torch.nn.MultiheadAttention with the same weights (logits and gradients)
and trains as torch.optim.AdamW trains it; every head of a grid trained at once equals that head
trained alone; on a task where only the position of an object tells the class, a linear probe on
the mean of the tokens is at chance and the attentive probe is not; bad inputs are one-line errors.
"""

from __future__ import annotations

import csv
import itertools
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featstore.console import run_cli
from featstore.store import FeatureStore
from probe.cli import main as probe_cli
from probe.methods.attention import DECAYED, LN_EPS, NAMES, AttentiveHeads, default_heads, initial
from probe.methods.attentive import token_dtype
from probe.protocol import Protocol

F64 = torch.float64


class Reference(nn.Module):
    """One attentive head written the plain way: every token normalized and projected to keys and
    values by torch.nn.MultiheadAttention (which keeps a key bias: it must not matter)."""

    def __init__(self, dim: int, heads: int, classes: int, queries: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.query = nn.Parameter(torch.randn(queries, dim, generator=g, dtype=F64) * 0.5)
        self.ln1 = nn.LayerNorm(dim, eps=LN_EPS, dtype=F64)
        self.mha = nn.MultiheadAttention(dim, heads, bias=True, batch_first=True, dtype=F64)
        self.ln2 = nn.LayerNorm(dim, eps=LN_EPS, dtype=F64)
        self.fc = nn.Linear(dim, classes, dtype=F64)
        with torch.no_grad():
            for p in self.parameters():  # away from the init: every parameter, biases and gains too, acts
                p.add_(torch.randn(p.shape, generator=g, dtype=F64) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.ln1(x)
        q = self.query.unsqueeze(0).expand(x.shape[0], -1, -1)
        o, _ = self.mha(q, k, k, need_weights=False)
        return self.fc(self.ln2(q + o).mean(1))

    def named(self) -> dict[str, nn.Parameter]:
        """The batched head's parameter names → this module's tensors (matrices transposed: (in, out))."""
        d = self.query.shape[1]
        w, b = self.mha.in_proj_weight, self.mha.in_proj_bias
        return {"query": self.query, "wq": w[:d].T, "bq": b[:d], "wk": w[d : 2 * d].T, "wv": w[2 * d :].T, "bv": b[2 * d :],
                "wo": self.mha.out_proj.weight.T, "bo": self.mha.out_proj.bias, "g1": self.ln1.weight, "b1": self.ln1.bias,
                "g2": self.ln2.weight, "b2": self.ln2.bias, "wc": self.fc.weight.T, "bc": self.fc.bias}  # fmt: skip


def _tokens(n: int, t: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g, dtype=F64) * 2 + torch.randn(1, t, d, generator=g, dtype=F64)


@pytest.mark.parametrize("queries", [1, 3])
def test_batched_head_equals_multihead_attention(queries):
    """Logits and every parameter's gradient equal the per-token-projection module's, for every head
    of the grid (the key bias, which the batched head drops, changes nothing)."""
    d, heads, classes = 24, 4, 5
    ref = Reference(d, heads, classes, queries, seed=1)
    init = {n: t.detach().clone() for n, t in ref.named().items()}
    batched = AttentiveHeads(init, heads, [1e-3, 1e-2, 0.1], [0.0, 0.0, 0.05], dtype=F64)
    x, y = _tokens(7, 9, d, seed=2), torch.tensor([0, 1, 2, 3, 4, 0, 1])

    expected = ref(x)
    logits = batched.logits(x)
    assert logits.shape == (7, 3, classes)
    for g in range(3):
        torch.testing.assert_close(logits[:, g], expected, rtol=1e-12, atol=1e-12)
    assert expected.std() > 0.1  # not a degenerate comparison

    nn.functional.cross_entropy(expected, y).backward()
    objective, sums = batched.loss(x, y)
    objective.backward()
    torch.testing.assert_close(sums, torch.full((3,), nn.functional.cross_entropy(expected, y).item() * 7, dtype=F64))
    for name, _tensor in ref.named().items():
        grad = batched.params[name].grad
        assert grad is not None
        reference = _grad_of(ref, name)
        for g in range(3):
            torch.testing.assert_close(grad[g], reference, rtol=1e-10, atol=1e-12, msg=name)
    assert ref.mha.in_proj_bias.grad[d : 2 * d].abs().max() < 1e-12  # the key bias: no gradient, no effect


def _grad_of(ref: Reference, name: str) -> torch.Tensor:
    """The gradient of ``ref``'s tensor behind a batched-head name, in (in, out) layout."""
    d = ref.query.shape[1]
    gw, gb = ref.mha.in_proj_weight.grad, ref.mha.in_proj_bias.grad
    assert gw is not None and gb is not None
    grads = {"query": ref.query.grad, "wq": gw[:d].T, "bq": gb[:d], "wk": gw[d : 2 * d].T, "wv": gw[2 * d :].T, "bv": gb[2 * d :],
             "wo": ref.mha.out_proj.weight.grad.T, "bo": ref.mha.out_proj.bias.grad, "g1": ref.ln1.weight.grad,
             "b1": ref.ln1.bias.grad, "g2": ref.ln2.weight.grad, "b2": ref.ln2.bias.grad, "wc": ref.fc.weight.grad.T,
             "bc": ref.fc.bias.grad}  # fmt: skip
    out = grads[name]
    assert out is not None
    return out


@pytest.mark.parametrize("optimizer", [pytest.param("adamw", marks=pytest.mark.slow), "sgd"])  # adamw took 4-6 s here, sgd ~1 s
def test_trains_as_torch_optim_trains_the_reference(optimizer):
    """Ten steps of the hand-written optimizer on the batched head = torch.optim on the reference
    module with V-JEPA's parameter groups (decay on the matrices and the query only)."""
    d, heads, classes, lr, wd = 16, 2, 3, 0.01, 0.1
    ref = Reference(d, heads, classes, 2, seed=3)
    init = {n: t.detach().clone() for n, t in ref.named().items()}
    batched = AttentiveHeads(init, heads, [lr], [wd], dtype=F64)
    decayed = {id(t) for t in (ref.query, ref.mha.in_proj_weight, ref.mha.out_proj.weight, ref.fc.weight)}
    groups = [{"params": [p for p in ref.parameters() if id(p) in decayed], "weight_decay": wd},
              {"params": [p for p in ref.parameters() if id(p) not in decayed], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=lr) if optimizer == "adamw" else torch.optim.SGD(groups, lr=lr, momentum=0.9)
    assert {"query", "wq", "wk", "wv", "wo", "wc"} == DECAYED
    for step in range(10):
        x, y = _tokens(6, 5, d, seed=10 + step), torch.arange(6) % classes
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
        batched.loss(x, y)[0].backward()
        batched.step(optimizer, 1.0)
    x = _tokens(8, 5, d, seed=99)
    torch.testing.assert_close(batched.logits(x)[:, 0], ref(x), rtol=1e-9, atol=1e-10)
    for name, tensor in ref.named().items():
        if name != "bk":
            torch.testing.assert_close(batched.head(0)[name], tensor.detach(), rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.slow  # five trainings (~3 s)
def test_grid_at_once_equals_each_head_alone():
    """Four (lr, wd) heads trained together = each trained alone, same init and batches (float32)."""
    d, heads, classes = 32, 2, 4
    lrs, wds = [1e-3, 1e-3, 3e-2, 3e-2], [0.0, 0.05] * 2
    init = initial(d, classes, 2, seed=0)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(16, 10, d, generator=g).half(), torch.randint(0, classes, (16,), generator=g)) for _ in range(8)]

    def trained(lr_list, wd_list):
        h = AttentiveHeads(init, heads, lr_list, wd_list)
        for s, (x, y) in enumerate(batches):
            h.loss(x, y)[0].backward()
            h.step("adamw", 0.5 * (1 + np.cos(np.pi * s / len(batches))))
        return h

    grid = trained(lrs, wds)
    probe_x = batches[0][0]
    for k, (lr, wd) in enumerate(zip(lrs, wds)):
        alone = trained([lr], [wd])
        for name in NAMES:
            torch.testing.assert_close(grid.head(k)[name], alone.head(0)[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(grid.logits(probe_x)[:, k], alone.logits(probe_x)[:, 0], rtol=1e-5, atol=1e-5)
    # and the heads did train apart: different lr, different weights
    assert not torch.allclose(grid.head(0)["wc"], grid.head(2)["wc"], atol=1e-3)


def test_bfloat16_products_on_tokens_normalized_once_follow_float32():
    """The bfloat16 path (tokens normalized once, as read, held in bfloat16) gives float32's logits to
    bfloat16 rounding, and ``normalized=True`` on ``normalize(x)`` is the raw path exactly."""
    d, heads, classes = 64, 4, 6
    init = initial(d, classes, 2, seed=3)
    init = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) for i, (k, v) in enumerate(init.items())}
    x = _tokens(16, 49, d, seed=4).float().half()
    f32 = AttentiveHeads(init, heads, [1e-3, 1e-2], [0.0, 0.0])
    bf16 = AttentiveHeads(init, heads, [1e-3, 1e-2], [0.0, 0.0], token_dtype=torch.bfloat16)
    assert bf16.normalize(x).dtype == torch.bfloat16 and f32.normalize(x).dtype == torch.float32
    torch.testing.assert_close(f32.logits(f32.normalize(x), normalized=True), f32.logits(x), rtol=0, atol=0)
    exact = f32.logits(x)
    assert exact.std() > 0.1
    torch.testing.assert_close(bf16.logits(bf16.normalize(x), normalized=True), exact, rtol=0.02, atol=0.03)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bfloat16_token_products_on_cuda_follow_float32_on_cpu():
    """The GPU path (bfloat16 products over the tokens, float32 weights) trains as the CPU's float32."""
    d, heads, classes = 64, 2, 5
    init = initial(d, classes, 1, seed=0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 49, d, generator=g).half(), torch.randint(0, classes, (32,), generator=g)) for _ in range(5)]
    cpu = AttentiveHeads(init, heads, [1e-3, 1e-2], [0.0, 0.0])
    gpu = AttentiveHeads(init, heads, [1e-3, 1e-2], [0.0, 0.0], device="cuda", token_dtype=torch.bfloat16)
    for x, y in batches:
        for h, dev in ((cpu, "cpu"), (gpu, "cuda")):
            h.loss(x.to(dev), y.to(dev))[0].backward()
            h.step("adamw", 1.0)
    x = batches[0][0]
    torch.testing.assert_close(gpu.logits(x.cuda()).cpu(), cpu.logits(x), rtol=0.05, atol=0.05)


def test_initial_parameters_and_default_heads():
    p = initial(384, 10, 2, seed=7)
    assert p["query"].shape == (2, 384) and p["wq"].shape == (384, 384) and p["wc"].shape == (384, 10)
    assert 0.019 < float(p["wq"].std()) < 0.021  # trunc_normal(std 0.02) cut at ±2 (absolute, as timm's in V-JEPA)
    assert float(p["g1"].min()) == float(p["g1"].max()) == 1.0 and float(p["bq"].abs().max()) == 0.0
    torch.testing.assert_close(initial(384, 10, 2, seed=7)["wk"], p["wk"])
    assert [default_heads(d) for d in (384, 768, 1024, 192, 48, 100)] == [6, 12, 16, 3, 1, 1]


# ---------------------------------------------------------------- through probe fit, on a store


def write_token_store(path: Path, sizes: dict[str, int], side: int = 4, dim: int = 16, seed: int = 0) -> Path:
    """A store written directly (no encoder): ``patch`` (side×side×dim) tokens and their mean
    ``avgpool``; class = the quadrant of the one token carrying a marker, position codes per token."""
    rng = np.random.default_rng(seed)
    position = rng.standard_normal((side * side, dim)).astype(np.float32)
    splits, tokens = {}, {}
    for split, n in sizes.items():
        y = rng.integers(0, 4, n)
        t = rng.standard_normal((n, side * side, dim)).astype(np.float32) * 0.3 + position
        half = side // 2
        for i in range(n):
            qy, qx = divmod(int(y[i]), 2)
            t[i, (qy * half + rng.integers(0, half)) * side + qx * half + rng.integers(0, half), 0] += 4.0
        splits[split] = ([f"{split}/{i}.png" for i in range(n)], y)
        tokens[split] = t.reshape(n, side, side, dim)
    store = FeatureStore.create(path, splits=splits, views={"patch": (side, side, dim), "avgpool": dim}, chunk_rows=32)
    for split in sizes:
        for unit in store.units(split):
            block = tokens[split][unit.start : unit.stop]
            store.write_unit(
                unit, {"patch": block.astype(np.float16), "avgpool": block.mean((1, 2)).astype(np.float16)}, np.ones(unit.rows)
            )
    store.finalize()
    return path


@pytest.fixture(scope="module")
def token_store(tmp_path_factory) -> Path:
    return write_token_store(tmp_path_factory.mktemp("tokens") / "t.zarr", {"train": 96, "val": 32, "test": 32})


def _fit(store, out, *extra) -> tuple[int, str]:
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = run_cli(probe_cli, "probe", ["fit", "--store", str(store), "--out", str(out), "--quiet", *map(str, extra)])
    return code, err.getvalue()


@pytest.mark.slow  # three probe runs (~3 s)
def test_attentive_rows_beside_linear_streamed_equals_rows_seen(token_store, tmp_path):
    """linear on avgpool and attentive on patch in one results table; a run that streams the tokens
    in blocks of rows trains on the same rows (another order) and writes the same columns."""
    import probe

    protocol = Protocol(methods=("linear", "attentive"), lr_grid="1e-3,1e-2", epochs=2, batch_size=32)
    result = probe.fit_run(str(token_store), protocol, views=["avgpool", "patch"], out=tmp_path / "run")
    rows = result.rows
    assert {(r["view"], r["method"]) for r in rows} == {("avgpool", "linear"), ("patch", "attentive")}
    attentive = [r for r in rows if r["method"] == "attentive"]
    assert [r["lr"] for r in attentive] == [1e-3, 1e-2] and sum(r["selected"] for r in attentive) == 1
    assert all(r["optimizer"] == "adamw" and r["normalize"] == "layernorm" and r["n_train"] == 96 for r in attentive)
    assert {r["dtype"] for r in attentive} == {str(token_dtype(torch.device("cpu"))).removeprefix("torch.")}
    chosen = next(r for r in attentive if r["selected"])
    pred = chosen["report_predictions"]
    assert pred is not None and len(pred["pred"]) == 32 and pred["top5"] is None  # 4 classes: no top-5
    assert np.mean(pred["pred"] == pred["target"]) * 100 == pytest.approx(chosen["report_top1_pct"])  # they agree
    record = json.loads((tmp_path / "run" / "protocol.json").read_text())
    assert record["protocol"]["attentive_optimizer"] == "adamw" and record["protocol"]["attentive_queries"] == 1
    with open(tmp_path / "run" / "results.csv") as f:
        assert {r["method"] for r in csv.DictReader(f)} == {"linear", "attentive"}
    assert {c.key.method for c in result.comparison.rows} == {"linear", "attentive"}

    logs: list[str] = []
    streamed = probe.fit(
        str(token_store), protocol.replace(methods=["attentive"]), views=["patch"], max_memory=40 * 16 * 16 * 2, log=logs.append
    )
    assert any("streamed in blocks of 40 rows" in m for m in logs), logs
    assert [r["n_train"] for r in streamed] == [96, 96] and all(r["train_loss"] is not None for r in streamed)


@pytest.mark.slow  # four probe runs
def test_streamed_schedule_decays_to_zero_once(token_store, monkeypatch):
    """Streamed, each block is cut into its own minibatches (96 rows in 20-row blocks, batch 32: 5
    steps an epoch, not 3): the cosine schedule counts those steps, so it falls to ~0 at the last one
    and never climbs back, as in memory."""
    import probe
    from probe.methods import attention

    factors: list[float] = []
    step = attention.AttentiveHeads.step

    def spy(self, optimizer, factor, **kw):
        factors.append(factor)
        return step(self, optimizer, factor, **kw)

    monkeypatch.setattr(attention.AttentiveHeads, "step", spy)
    protocol = Protocol(methods=("attentive",), lr_grid="1e-3,1e-2", epochs=4, batch_size=32)
    for max_memory, steps in ((None, 4 * 3), (20 * 16 * 16 * 2, 4 * 5)):
        factors.clear()
        probe.fit(str(token_store), protocol, views=["patch"], max_memory=max_memory, log=lambda _: None)
        run = factors[:steps]  # the sweep's training (a refit, if any, starts again at 1)
        assert len(run) == steps and run[0] == 1.0, (max_memory, factors)
        assert all(a >= b for a, b in itertools.pairwise(run)), (max_memory, run)  # never climbs back
        assert run[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * (steps - 1) / steps)))  # ~0 at the last step
        assert len(factors) == steps or factors[steps] == 1.0, factors


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--method", "attentive", "--view", "avgpool"], ["needs a patch view", "--view patch"]),
        (["--method", "linear", "--view", "patch"], ["needs global features", "--method attentive"]),
        (["--method", "attentive", "--attention-heads", "5"], ["5 attention heads do not divide", "divisor of 16"]),
        (["--method", "attentive", "--queries", "0"], ["--queries must be >= 1"]),
        (["--method", "attentive", "--max-memory", "lots"], ["bad --max-memory", "512M"]),
        (["--save-predictions", "--precision", "bf16"], ["--save-predictions, --precision applies to --task depth or seg"]),
        (["--depth-head", "linear"], ["--depth-head applies to --task depth or seg"]),
    ],
)
def test_cli_errors_are_one_line(token_store, tmp_path, args, needles):
    code, err = _fit(token_store, tmp_path / "out", *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_attentive_on_a_store_without_patch_views_names_the_fix(tmp_path):
    store = FeatureStore.create(tmp_path / "g.zarr", splits={"train": ([f"{i}.png" for i in range(8)], np.arange(8) % 2)}, views={"cls": 4})
    for unit in store.units("train"):
        store.write_unit(unit, {"cls": np.ones((unit.rows, 4), np.float16)}, np.ones(unit.rows))
    store.finalize()
    code, err = _fit(tmp_path / "g.zarr", tmp_path / "out", "--method", "attentive")
    assert code != 0 and err.startswith("error: ") and "featstore extract --views patch" in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- the quadrant task, through an encoder


ENCODER = '''
import math
import torch
from torch import nn


class Tokens(nn.Module):
    """Patch tokens = the patch's mean colour (local appearance) ⊕ a fixed sinusoidal position code."""

    def __init__(self, grid=4, width=16):
        super().__init__()
        y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        freqs = torch.tensor([1.0, 2.0, 4.0, 8.0]) * math.pi / grid
        angles = torch.cat([y.reshape(-1, 1) * freqs, x.reshape(-1, 1) * freqs], 1)  # (grid², 8)
        code = torch.cat([angles.sin(), angles.cos()], 1)[:, :width]  # (grid², width)
        self.register_buffer("code", code.t().reshape(1, width, grid, grid))
        self.grid = grid

    def forward(self, x):
        local = nn.functional.adaptive_avg_pool2d(x, self.grid)  # (B, 3, g, g)
        patch = torch.cat([local * 4, self.code.expand(x.shape[0], -1, -1, -1)], 1)
        return {"patch": patch, "avgpool": patch.mean((2, 3))}


def build():
    return Tokens()
'''


def write_quadrant_images(root: Path, sizes: dict[str, int], size: int = 32, seed: int = 0) -> None:
    """Gray images with one bright square in a random quadrant; the class folder is the quadrant."""
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        for i in range(n):
            label = i % 4
            img = np.full((size, size, 3), 60, np.uint8) + rng.integers(0, 20, (size, size, 3)).astype(np.uint8)
            half, box = size // 2, size // 4
            oy = (label // 2) * half + rng.integers(0, half - box + 1)
            ox = (label % 2) * half + rng.integers(0, half - box + 1)
            img[oy : oy + box, ox : ox + box] = (250, 240, 60)
            folder = root / split / f"q{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}.png")


@pytest.mark.slow  # extracts ~600 images and trains (~20 s)
def test_quadrant_task_linear_at_chance_attentive_above_90(tmp_path):
    from featstore.extraction import ExtractConfig, extract

    write_quadrant_images(tmp_path / "data", {"train": 400, "val": 100, "test": 100})
    (tmp_path / "enc.py").write_text(textwrap.dedent(ENCODER))
    store = tmp_path / "q.zarr"
    extract(ExtractConfig(model=f"{tmp_path / 'enc.py'}:build", dataset=str(tmp_path / "data"), out=str(store), image_size=32,
                          resize=32, loader="torch", workers=0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), progress=False)  # fmt: skip
    fs = FeatureStore.open(store)
    assert fs.patch_views == {"patch": (4, 4, 19)} and fs.views["avgpool"] == 19
    code, err = _fit(store, tmp_path / "run", "--method", "linear,attentive", "--lr-grid", "1e-3:1e-1:5", "--epochs", "30",
                     "--batch-size", "32", "--view", "avgpool", "--view", "patch")  # fmt: skip
    assert code == 0, err
    with open(tmp_path / "run" / "results.csv") as f:
        chosen = {r["method"]: float(r["report_top1_pct"]) for r in csv.DictReader(f) if r["selected"] == "true"}
    # the mean of the tokens holds the square's colour but not where it is: 4 classes, 100 test images
    assert chosen["linear"] <= 25 + 12, chosen
    assert chosen["attentive"] >= 90, chosen
    # the paired comparison reads the attentive rows back from the run like any method's
    import io
    from contextlib import redirect_stdout

    printed = io.StringIO()
    with redirect_stdout(printed):
        assert run_cli(probe_cli, "probe", ["compare", str(tmp_path / "run"), "--json"]) == 0
    compared = {(r["view"], r["method"]): r for r in json.loads(printed.getvalue())["rows"]}
    assert compared[("patch", "attentive")]["n"] == 100 and compared[("avgpool", "linear")]["n"] == 100


@pytest.mark.slow  # a probe run (~2 s)
def test_attentive_alone_probes_only_the_patch_views(token_store, monkeypatch):
    """With no --view, ``--method attentive`` probes the store's patch views, and reads no global view."""
    import probe

    read: list[str] = []
    real = FeatureStore.features
    monkeypatch.setattr(FeatureStore, "features", lambda self, split, view: read.append(view) or real(self, split, view))
    rows = probe.fit(str(token_store), Protocol(methods=["attentive"], lr_grid="1e-2", epochs=1, batch_size=48))
    assert {r["view"] for r in rows} == {"patch"} and len(rows) == 1 and rows[0]["selected"]
    assert read == []
