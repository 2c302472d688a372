"""Training objectives: On-policy Coherent Noising (OCN), its ablation controls, AR and dense CE.

OCN (see ../shared/docs/diffgrm-reference.md):
1. encode the history once;
2. probe: decoder with every digit masked, no gradient, dropout off -> per-digit confidence
   (max softmax probability, or negative entropy);
3. order digits least-confident first and build n nested views, view t masking the t
   least-confident digits (view n masks all); all views share the encoder output, so the
   decoder runs on an (n*B)-row batch;
4. label-smoothed cross-entropy on masked digits only, averaged per view then over views
   (the paper's ``view`` mean) or over all masked tokens (the released code's ``token``).

Controls: ``random`` (each digit masked with p=0.5 in each of n views: "w/o OCN"),
``random_order`` (nested views in a random order: "w/o on-policy"), ``most_confident``
(nested views most-confident first), ``refresh`` (confidence recomputed before each view:
reveal the most confident still-masked digit, probe again, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from diffgrm_dist.model.network import DiffGRM, Memory

OBJECTIVES = ("ocn", "random", "random_order", "most_confident", "refresh")


@contextlib.contextmanager
def no_dropout(module: nn.Module) -> Iterator[None]:
    """Evaluation mode for the duration of the block, then the previous mode back."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def confidence(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, n, K) logits -> (B, n) confidence per digit; higher means more certain."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if kind == "max_prob":
        return logp.max(dim=-1).values.exp()
    if kind == "neg_entropy":
        p = logp.exp()
        return (p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    raise ValueError(f"train.confidence: {kind!r} is not max_prob or neg_entropy")


def nested_views(rank: torch.Tensor) -> torch.Tensor:
    """rank (B, n): position of each digit in masking order -> masks (n, B, n): view t
    (0-based) masks the digits of rank <= t."""
    n = rank.shape[1]
    steps = torch.arange(n, device=rank.device)[:, None, None]
    return rank[None] <= steps


def rank_of(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation per row: order[b, j] = digit masked j-th -> rank[b, digit] = j."""
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank


def smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float,
                           valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row label-smoothed cross-entropy, the smoothing mass spread over valid classes only.

    logits (R, K), targets (R,), valid (R, K) bool or None (all valid). Classes that do not
    exist (codes beyond a smaller digit's size) get neither probability nor gradient;
    ``F.cross_entropy(label_smoothing=...)`` would spread mass onto their -inf/-1e9 logits."""
    logits = logits.float()
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(1, targets[:, None])[:, 0]
    if not label_smoothing:
        return nll
    if valid is None:
        uniform = -logp.mean(-1)
    else:
        uniform = -torch.where(valid, logp, torch.zeros_like(logp)).sum(-1) / valid.sum(-1)
    return (1.0 - label_smoothing) * nll + label_smoothing * uniform


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                         label_smoothing: float, mean: str, sizes: tuple[int, ...]) -> torch.Tensor:
    """logits (V, B, n, K), targets (B, n), masks (V, B, n) -> scalar loss."""
    v, b, n, k = logits.shape
    valid = None
    if len(set(sizes)) > 1:  # a digit with fewer codes (the extra digit): smooth over its own
        per_digit = torch.arange(k, device=logits.device) < torch.tensor(sizes, device=logits.device)[:, None]
        valid = per_digit.expand(v, b, n, k).reshape(-1, k)
    ce = smoothed_cross_entropy(logits.reshape(-1, k), targets.expand(v, b, n).reshape(-1),
                                label_smoothing, valid).view(v, b, n)
    m = masks.to(ce.dtype)
    if mean == "token":
        return (ce * m).sum() / m.sum().clamp_min(1.0)
    if mean == "view":
        per_view = (ce * m).sum(-1) / m.sum(-1).clamp_min(1.0)  # (V, B)
        return per_view.mean()
    raise ValueError(f"train.loss_mean: {mean!r} is not view or token")


class DiffusionObjective(nn.Module):
    """Wraps the model so the whole training computation is one forward (as DeepSpeed wants)."""

    def __init__(self, model: DiffGRM, objective: str, confidence: str, label_smoothing: float,
                 loss_mean: str) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"train.objective: {objective!r} is not one of {OBJECTIVES}")
        self.model = model
        self.objective, self.confidence = objective, confidence
        self.label_smoothing, self.loss_mean = label_smoothing, loss_mean

    def views(self, memory: Memory, targets: torch.Tensor) -> torch.Tensor:
        """(n, B, n) bool masks of the n views for this batch."""
        b, n = targets.shape
        if self.objective == "random":
            masks = torch.rand(n, b, n, device=targets.device) < 0.5
            none = ~masks.any(-1)  # a view with nothing masked teaches nothing: mask one digit
            pick = torch.randint(0, n, (n, b), device=targets.device)
            masks[none, pick[none]] = True
            return masks
        if self.objective == "random_order":
            return nested_views(rank_of(torch.argsort(torch.rand(b, n, device=targets.device), 1)))
        if self.objective == "refresh":
            return self._refreshed_views(memory, targets)
        all_masked = torch.ones_like(targets, dtype=torch.bool)
        conf = self.probe(memory, targets, all_masked)
        order = torch.argsort(conf, dim=1, descending=self.objective == "most_confident", stable=True)
        return nested_views(rank_of(order))

    @torch.no_grad()
    def probe(self, memory: Memory, codes: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        with no_dropout(self.model):
            logits = self.model.denoise(_detached(memory), codes, masked)
        return confidence(logits, self.confidence)

    def _refreshed_views(self, memory: Memory, targets: torch.Tensor) -> torch.Tensor:
        b, n = targets.shape
        masked = torch.ones_like(targets, dtype=torch.bool)
        views = [masked.clone()]
        for _ in range(n - 1):
            conf = self.probe(memory, targets, masked).masked_fill(~masked, float("-inf"))
            reveal = conf.argmax(dim=1)
            masked = masked.clone()
            masked[torch.arange(b, device=targets.device), reveal] = False
            views.append(masked.clone())
        return torch.stack(views[::-1])  # view t masks t+1 digits

    def forward(self, history: torch.Tensor, history_mask: torch.Tensor, targets: torch.Tensor,
                items: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.model.encode(history, history_mask)
        masks = self.views(memory, targets)  # (V, B, n)
        v, b, n = masks.shape
        # Rows grouped per example (B, V): the V views share the example's encoder output.
        rows = masks.transpose(0, 1).reshape(b * v, n)
        logits = self.model.denoise(memory, targets.repeat_interleave(v, 0), rows)
        logits = logits.view(b, v, n, -1).transpose(0, 1)
        return masked_cross_entropy(logits, targets, masks, self.label_smoothing,
                                    self.loss_mean, self.model.spec.sizes)


class AutoregressiveObjective(nn.Module):
    """Teacher-forced cross-entropy of the autoregressive (TIGER-style) decoder."""

    def __init__(self, model: DiffGRM, label_smoothing: float) -> None:
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, history: torch.Tensor, history_mask: torch.Tensor, targets: torch.Tensor,
                items: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.model.encode(history, history_mask)
        logits = self.model.autoregress(memory, targets[:, :-1])
        masks = torch.ones_like(targets, dtype=torch.bool)[None]
        return masked_cross_entropy(logits[None], targets, masks, self.label_smoothing, "token",
                                    self.model.spec.sizes)


class DenseObjective(nn.Module):
    """Full-softmax cross-entropy over the catalogue's items (the SASRec-style baseline)."""

    def __init__(self, model: DiffGRM, label_smoothing: float) -> None:
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, history: torch.Tensor, history_mask: torch.Tensor, targets: torch.Tensor,
                items: torch.Tensor | None = None) -> torch.Tensor:
        if items is None:
            raise ValueError("the dense objective needs the target items")
        logits = self.model.item_logits(self.model.encode(history, history_mask))
        return smoothed_cross_entropy(logits, items, self.label_smoothing).mean()


def _detached(memory: Memory) -> Memory:
    return Memory([(k.detach(), v.detach()) for k, v in memory.kv], memory.mask, memory.last.detach())
