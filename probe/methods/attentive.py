"""The attentive probe as a :class:`~probe.methods.method.Method`: a cross-attention pooler with a
linear classifier over a patch view's tokens (:mod:`probe.methods.attention`), every (lr, wd) head
of the grid trained at once, the head chosen on the selection rows, then (when those rows are a
holdout of train) that head trained again on train + holdout and reported.

Tokens are float16 as stored. The products over every token run in :func:`token_dtype`
(bfloat16 on CUDA and on CPUs with bfloat16 units, else float32: then the float16 tokens are
normalized in float32 per minibatch). They are held on the device when a role's rows fit ``--max-memory``; the minibatches are then the linear heads' (one permutation of
the split's rows per epoch, drawn from the seed). Beyond it they stream from the store in blocks
of rows: an epoch visits the blocks in a seeded random order and shuffles the rows within each
block (the rows an epoch sees are the same, the minibatches differ; the log says which).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import NDArray

from featstore.errors import FeatstoreError, UsageError

from . import attention as A
from . import heads as H
from .method import Case, Config, MethodResult, Metrics, Ranking, grid_configs, select_head
from .token_rows import TokenRows, default_memory, minibatches_per_epoch

EVAL_ROWS = 256  # rows per evaluation batch
NORMALIZE_ROWS = 1024  # rows read and normalized at a time when the tokens are loaded


class Attentive:
    """Batched attentive heads over the protocol's lr × wd grid, on a patch view."""

    name = "attentive"
    seeded = True  # the initialization and the minibatch order are drawn from the seed
    tokens = True  # reads patch tokens (case.tokens), not global features

    def variant(self, case: Case) -> Hashable:
        return (case.seed, case.refits())

    def run(self, case: Case) -> MethodResult:
        protocol = case.protocol
        assert case.tokens is not None, "the attentive probe runs on a patch view"
        source = case.tokens
        t, dim = source["train"].shape
        num_heads = attention_heads(protocol.attentive_heads, dim, case.where)
        lrs = [lr for lr, _ in protocol.heads]
        wds = [wd for _, wd in protocol.heads]
        heads = self._heads(case, dim, num_heads, lrs, wds)
        feed = Feed(source["train"], case.y["train"], case, heads)
        case.log(
            f"{case.name}: {heads.num_grid} attentive heads ({num_heads} attention heads, {protocol.attentive_queries} "
            f"quer{'y' if protocol.attentive_queries == 1 else 'ies'}) × {protocol.epochs} epochs on {len(feed)} rows × {t} tokens "
            f"(D={dim}, C={case.num_classes}) on {case.device}, tokens {feed.where}"
        )
        train_loss = train(heads, feed, case).cpu().numpy()
        finite = heads.finite().cpu().numpy()
        ranked = {"train": predict(heads, feed)}
        del feed
        for role in source:
            if role != "train":
                ranked[role] = predict(heads, Feed(source[role], case.y[role], case, heads))
        metrics = {role: H.accuracy(r, case.y[role], case.num_classes) for role, r in ranked.items()}

        def per_head(h: int) -> Metrics:
            if not finite[h]:
                return {}
            return {role: {k: float(v[h]) for k, v in m.items()} for role, m in metrics.items()}

        top1 = np.array([np.nan if not finite[h] else float(metrics["select"]["top1"][h]) for h in range(len(lrs))], dtype=float)
        chosen = select_head(case, top1, finite, "attentive head", "lower the learning rates (--lr-grid)")

        refit = case.refits()
        configs = grid_configs(protocol, train_loss, finite, chosen, refit, per_head)
        if refit:
            return self._refit(case, configs[chosen], configs, num_heads)
        shown = case.reported_role
        predictions: dict[str, Ranking] = {}
        if shown:
            top = ranked[shown][:, chosen].cpu().numpy()
            predictions[shown] = (top[:, 0], top[:, :5] if top.shape[1] == 5 else None)
        return MethodResult(configs, predictions)

    def _heads(self, case: Case, dim: int, num_heads: int, lrs: list[float], wds: list[float]) -> A.AttentiveHeads:
        init = A.initial(dim, case.num_classes, case.protocol.attentive_queries, case.seed)
        return A.AttentiveHeads(init, num_heads, lrs, wds, case.device, token_dtype=token_dtype(case.device))

    def _refit(self, case: Case, chosen: Config, configs: list[Config], num_heads: int) -> MethodResult:
        """The chosen head trained again, alone, on train + holdout (in split order), from the same
        initialization, under the same protocol; reported once."""
        assert case.tokens is not None
        both = case.tokens["train"].join(case.tokens["select"])
        rows = np.concatenate([case.rows["train"], case.rows["select"]])
        labels = torch.cat([case.y["train"], case.y["select"]])
        y = labels[torch.from_numpy(np.argsort(rows, kind="stable")).to(labels.device)]
        lr, wd = chosen.settings["lr"], chosen.settings["wd"]
        head = self._heads(case, both.shape[1], num_heads, [lr], [wd])
        feed = Feed(both, y, case, head)
        case.log(
            f"{case.name}: attentive refit of lr {lr:g}{f' wd {wd:g}' if wd else ''} on {len(both)} rows (train + holdout), tokens {feed.where}"
        )
        train_loss = float(train(head, feed, case)[0])
        if not bool(head.finite()[0]):
            raise FeatstoreError(
                f"{case.where}: the attentive refit of lr {lr:g} on train + holdout diverged",
                "lower the learning rates, or pass --no-refit",
            )
        metrics = {"train": {k: float(v[0]) for k, v in H.accuracy(predict(head, feed), y, case.num_classes).items()}}
        del feed
        ranked = predict(head, Feed(case.tokens["report"], case.y["report"], case, head))
        metrics["report"] = {k: float(v[0]) for k, v in H.accuracy(ranked, case.y["report"], case.num_classes).items()}
        top = ranked[:, 0].cpu().numpy()
        extra = {"train_loss": round(train_loss, 6) if math.isfinite(train_loss) else None, "diverged": False}
        configs.append(Config({"lr": lr, "wd": wd, "refit": True}, metrics, selected=True, extra=extra))
        return MethodResult(configs, {"report": (top[:, 0], top[:, :5] if top.shape[1] == 5 else None)})

    def columns(self, case: Case, config: Config) -> dict[str, Any]:
        p = case.protocol
        return {"dtype": str(token_dtype(case.device)).replace("torch.", ""), "lr": config.settings["lr"], "wd": config.settings["wd"], "optimizer": p.attentive_optimizer, "epochs": p.epochs,
                "batch_size": p.batch_size, "momentum": p.momentum if p.attentive_optimizer == "sgd" else None,
                "normalize": "layernorm", "train_loss": config.extra["train_loss"], "diverged": config.extra["diverged"]}  # fmt: skip

    def setting(self, row: Mapping[str, Any]) -> str:
        text = f"lr {row['lr']:g}" + (f" wd {row['wd']:g}" if row.get("wd") else "")
        return text + (" (refit)" if row.get("refit") else "")


def token_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the products over every token: bfloat16 on CUDA (as the linear heads) and on a
    CPU with bfloat16 units (AVX512-BF16 / AMX: there its GEMMs are 2-4× float32's; on other CPUs
    bfloat16 is emulated and slower), else float32. Weights, optimizer state, LayerNorms, softmax
    and loss stay float32; the ``dtype`` column records it."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) else torch.float32


def attention_heads(asked: int, dim: int, where: str) -> int:
    """``--attention-heads`` (0: D / 64, :func:`probe.methods.attention.default_heads`), checked against the tokens' width."""
    heads = asked or A.default_heads(dim)
    if dim % heads:
        raise UsageError(f"{where}: {heads} attention heads do not divide the tokens' width {dim}",
                         f"pass --attention-heads with a divisor of {dim} (or 0 for {A.default_heads(dim)})")  # fmt: skip
    return heads


@dataclass
class Feed:
    """One role's tokens and labels as minibatches: in memory when they fit, else streamed in blocks.

    The minibatches are what ``heads`` take: in float32, the raw float16 tokens (normalized per
    minibatch, in float32); in bfloat16, the tokens normalized once as they are read and held in
    bfloat16 (2 bytes a value either way), so a step does no per-token work but the GEMMs."""

    tokens: TokenRows
    y: torch.Tensor
    case: Case
    heads: A.AttentiveHeads

    def __post_init__(self) -> None:
        budget = self.case.max_memory or default_memory(self.case.device)
        self.block_rows = max(1, min(len(self.tokens), budget // max(self.tokens.row_bytes, 1)))
        self.normalized = self.heads.token_dtype != torch.float32
        self.held: torch.Tensor | None = None
        if self.block_rows >= len(self.tokens):
            t, d = self.tokens.shape
            dtype = self.heads.token_dtype if self.normalized else torch.float16
            self.held = torch.empty((len(self.tokens), t, d), dtype=dtype, device=self.case.device)  # filled in place: no second copy
            for start, block in self.tokens.blocks(NORMALIZE_ROWS):
                self.held[start : start + len(block)] = self._load(block)

    def _load(self, block: NDArray[np.float16]) -> torch.Tensor:
        x = torch.from_numpy(block).to(self.case.device)
        return self.heads.normalize(x) if self.normalized else x

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def steps_per_epoch(self) -> int:
        """The minibatches of an epoch: streamed, each block is cut into its own (the schedule's length)."""
        return minibatches_per_epoch(len(self.tokens), self.block_rows, self.case.protocol.batch_size)

    @property
    def where(self) -> str:
        return "in memory" if self.held is not None else f"streamed in blocks of {self.block_rows} rows"

    def epochs(self) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """Per epoch, its (float16 tokens, labels) minibatches."""
        p, dev = self.case.protocol, self.case.device
        bs = p.batch_size
        if self.held is not None:
            orders = torch.from_numpy(H.restrict_orders(_epoch_orders(self.case), self.tokens.rows)).to(dev)
            for order in orders:
                yield ((self.held.index_select(0, idx), self.y.index_select(0, idx)) for idx in torch.split(order, bs))
            return
        g = torch.Generator().manual_seed(self.case.seed)
        for _ in range(p.epochs):
            yield self._streamed(g, bs)

    def _streamed(self, g: torch.Generator, bs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, dev = len(self.tokens), self.case.device
        starts = list(range(0, n, self.block_rows))
        for b in torch.randperm(len(starts), generator=g).tolist():
            positions = np.arange(starts[b], min(starts[b] + self.block_rows, n))
            block = self._load(self.tokens.read(positions))  # the one resident block
            shuffled = torch.randperm(len(positions), generator=g).to(dev)
            y = self.y[torch.from_numpy(positions).to(dev)]
            for idx in torch.split(shuffled, bs):
                yield block.index_select(0, idx), y.index_select(0, idx)
            del block

    def in_order(self) -> Iterator[torch.Tensor]:
        """The float16 tokens of every row in row order, in batches (evaluation)."""
        if self.held is not None:
            yield from torch.split(self.held, EVAL_ROWS)
            return
        for _, block in self.tokens.blocks(self.block_rows):
            yield from torch.split(self._load(block), EVAL_ROWS)


def train(heads: A.AttentiveHeads, feed: Feed, case: Case) -> torch.Tensor:
    """Train every head for ``protocol.epochs`` epochs; the (G,) mean cross-entropy of each head over the last epoch."""
    p = case.protocol
    total = p.epochs * feed.steps_per_epoch
    loss = torch.zeros(heads.num_grid, dtype=torch.float64, device=case.device)
    step = 0
    for batches in feed.epochs():
        loss.zero_()
        for x, y in batches:
            objective, sums = heads.loss(x, y, feed.normalized)
            torch.autograd.backward(objective)
            heads.step(p.attentive_optimizer, H.schedule_factor(p, step, total), momentum=p.momentum, betas=p.betas, eps=p.eps)
            loss += sums
            step += 1
    return loss / len(feed)


@torch.no_grad()
def predict(heads: A.AttentiveHeads, feed: Feed, k: int = 5) -> torch.Tensor:
    """(N, G, min(k, C)) int64: every head's k best classes per row of ``feed``, in row order, best first."""
    k = min(k, heads.num_classes)
    return torch.cat([heads.logits(x, feed.normalized).topk(k, dim=-1).indices for x in feed.in_order()])


def _epoch_orders(case: Case) -> NDArray[np.int64]:
    """The linear heads' (epochs, split rows) minibatch orders of this seed (the same cache entry)."""
    key = ("linear.epoch_orders", case.split_rows, case.seed)
    if key not in case.cache:
        case.cache[key] = H.epoch_orders(case.split_rows, case.protocol.epochs, case.seed)
    return cast(NDArray[np.int64], case.cache[key])
