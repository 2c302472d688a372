"""Generation: CPD beam search (diffusion decoder), AR beam search, and SID -> item mapping,
against a catalogue index (``catalogue.py``) that says which partial codes some item has.

CPD (Confidence-guided Parallel Denoising), batched over users x beams with no Python loop
over beams or codes: start fully masked; at each of n steps score every (beam, unfilled
digit, code), add it to the beam's log-probability, keep the global top-B per user, fill
one digit (or m digits per decoder pass, ``fill_digits``). The encoder output and the cross-attention keys/values are computed once per
user; all beams of a user read them through grouped cross-attention.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from diffgrm_dist.core.ragged import ragged_positions
from diffgrm_dist.decode.catalogue import CatalogueIndex
from diffgrm_dist.model.network import DiffGRM, Memory

NEG_INF = float("-inf")
# How beams over codes become a ranking of items (see ``rank_items``).
ITEM_RULES = ("code_prob", "expand")
CPD_PRUNE = ("step", "final")  # where CPD drops partial codes that are no item's


# --------------------------------------------------------------------------- CPD


@dataclass
class Beams:
    """Finished beams per user: codes (U, B, n), scores (U, B) sorted, code group (U, B)."""

    codes: torch.Tensor
    scores: torch.Tensor
    groups: torch.Tensor


@torch.no_grad()
def cpd(model: DiffGRM, memory: Memory, catalogue: CatalogueIndex, beam: int,
        final_step: str = "global", fill_order: torch.Tensor | None = None,
        fill_digits: int = 1, merge_destinations: bool = True, prune: str = "step",
        merge_states: bool = True) -> Beams:
    """Confidence-guided Parallel Denoising.

    ``prune``: ``step`` (default) keeps only candidates whose filled digits some item has, at
    every step; ``final`` (the paper) lets every (unfilled digit, code) compete and drops
    codes that are no item's only when ranking the finished beams (``groups`` -1).
    ``merge_states``: True (default) merges beams that reach the same state (the same digits
    filled with the same codes, in another order) at every step, keeping the best score;
    False (the paper) keeps them apart and deduplicates codes only at the end, which lets
    one code occupy up to n! beam slots. The paper's CPD is ``final`` + no merging.
    ``final_step``: ``global`` keeps the global top-B selection to the end (paper);
    ``greedy`` fills each beam's last digit with its best existing code (released code).
    ``fill_order``: a fixed digit order (the ablation's "random fixed order"); None lets
    confidence choose.
    ``fill_digits`` (m): digits filled per decoder pass. After a pass, the global top-B
    selection runs m times on that pass's log-probabilities (each beam keeps its parent's
    table, filled digits blocked), so a beam's m new digits are the most confident ones and
    its score is their joint log-probability under that pass: ceil(n/m) passes instead of
    n. m = 1 is the paper's CPD.
    ``merge_destinations``: where the index can tell (``LongCodeCatalogue``), candidates whose
    filled digits leave a single code are merged with every other candidate heading to that
    code, keeping the best. With long codes a few filled digits already name one item, and
    without this the beams fill out many orders of the same few codes (at n = 32 all 32
    beams of a user ended on one code).
    """
    if fill_digits < 1:
        raise ValueError(f"eval.fill_digits must be >= 1, got {fill_digits}")
    if prune not in CPD_PRUNE:
        raise ValueError(f"eval.cpd_prune: {prune!r} is not one of {CPD_PRUNE}")
    users = memory.mask.shape[0]
    n, k = catalogue.digits, max(catalogue.sizes)
    device = memory.mask.device
    codes = torch.zeros(users, 1, n, dtype=torch.long, device=device)
    filled = torch.zeros(users, 1, n, dtype=torch.bool, device=device)
    scores = torch.zeros(users, 1, device=device)
    fills = 0  # digits filled so far (the same for every beam)
    # The code slots each digit has (codebooks may differ in size): what ``final`` allows.
    slots = torch.arange(k, device=device) < torch.tensor(catalogue.sizes, device=device)[:, None]  # (n, k)
    while fills < n:
        width = codes.shape[1]
        logits = model.denoise(memory, codes.view(-1, n), ~filled.view(-1, n))
        logp = torch.log_softmax(logits.float(), dim=-1).view(users, width, n, k)
        for _ in range(min(fill_digits, n - fills)):
            width = codes.shape[1]
            allowed, dest = _candidates(catalogue, codes, filled, slots, prune, merge_destinations and merge_states)
            if fill_order is not None:
                allowed = allowed & (torch.arange(n, device=device) == fill_order[fills])[None, None, :, None]
            total = (scores[..., None, None] + logp).masked_fill_(~allowed, NEG_INF)
            if fills == n - 1 and final_step == "greedy":
                new_scores, flat = total.view(users, width, n * k).max(dim=-1)
                pick_beam = torch.arange(width, device=device).expand(users, width)
            else:
                new_scores, pick_beam, flat = _top_states(catalogue, codes, filled, total, dest, beam, fills,
                                                          merge_states)
            digit, code = flat // k, flat % k
            codes = torch.gather(codes, 1, pick_beam[..., None].expand(-1, -1, n)).clone()
            filled = torch.gather(filled, 1, pick_beam[..., None].expand(-1, -1, n)).clone()
            codes.scatter_(2, digit[..., None], code[..., None])
            filled.scatter_(2, digit[..., None], True)
            scores = new_scores
            fills += 1
            if fills < n and fill_digits > 1:  # the next fill reads the same pass
                logp = torch.gather(logp, 1, pick_beam[..., None, None].expand(-1, -1, n, k))
    order = scores.argsort(dim=1, descending=True)
    scores = torch.gather(scores, 1, order)
    codes = torch.gather(codes, 1, order[..., None].expand(-1, -1, n))
    groups = catalogue.groups_of(codes)
    groups = torch.where(torch.isfinite(scores), groups, torch.full_like(groups, -1))
    return Beams(codes, scores, groups)


def _candidates(catalogue: CatalogueIndex, codes: torch.Tensor, filled: torch.Tensor, slots: torch.Tensor,
                prune: str, merge_destinations: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Which (beam, digit, code) fills may compete, (U, W, n, k), and where the index can tell
    each one's single destination code (else None): ``final`` allows every unfilled digit's
    code slots; ``step`` only fills some item still has."""
    if prune == "final":
        return ~filled[..., None] & slots, None
    if merge_destinations:
        return catalogue.candidate_destinations(codes, filled)
    return catalogue.candidates_exist(codes, filled), None


def _top_states(catalogue: CatalogueIndex, codes: torch.Tensor, filled: torch.Tensor, total: torch.Tensor,
                dest: torch.Tensor | None, beam: int, fills: int,
                merge_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global top-``beam`` selection of one fill: scores, parent beams and flat
    (digit * k + code) picks, (U, B) each. Merging keeps each state (or known destination)
    once, with its best score."""
    users, width, n, k = total.shape
    # A state with fills+1 filled digits has at most fills+1 parents among the (unique)
    # beams, so the best beam*(fills+1) candidates hold the best `beam` distinct states.
    # Merged destinations break that bound: widen (up to 16x) until `beam` distinct states remain.
    total_flat, take = total.view(users, -1), min(beam * (fills + 1), width * n * k)
    if not merge_states:  # every candidate is its own beam: the global top B
        take = min(beam, width * n * k)
    widest = min(16 * take, width * n * k)
    wanted = None if dest is None else torch.isfinite(total_flat).sum(1).clamp(max=beam)
    while True:
        cand_scores, idx = total_flat.topk(take, dim=-1)
        pick_beam, flat = idx // (n * k), idx % (n * k)
        if not merge_states:
            break
        key = catalogue.state_key(codes, filled, pick_beam, flat // k, flat % k)
        if dest is not None:  # known destination: the code names the state (keys < 0)
            known = dest.view(users, -1).gather(1, idx)
            key = torch.where(known >= 0, -(known + 1), key)
        cand_scores = _drop_repeats(key, cand_scores)
        if dest is None or take == widest or not (torch.isfinite(cand_scores).sum(1) < wanted).any():
            break
        take = min(take * 4, widest)
    new_scores, keep = cand_scores.topk(min(beam, take), dim=-1)
    return new_scores, pick_beam.gather(1, keep), flat.gather(1, keep)


def _drop_repeats(key: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """-inf for every candidate whose state an earlier (higher-scored) candidate reaches:
    the same code in another fill order is one state, kept once with its best score."""
    sorted_key, order = torch.sort(key, dim=1, stable=True)  # stable: score order within a key
    repeat = torch.zeros_like(sorted_key, dtype=torch.bool)
    repeat[:, 1:] = sorted_key[:, 1:] == sorted_key[:, :-1]
    dup = torch.zeros_like(repeat).scatter(1, order, repeat)
    return scores.masked_fill(dup, NEG_INF)


@torch.no_grad()
def ar_beam_search(model: DiffGRM, memory: Memory, catalogue: CatalogueIndex, beam: int,
                   kv_cache: bool = True) -> Beams:
    """Left-to-right beam search of the autoregressive decoder, constrained to prefixes
    that exist (prefixes are partial patterns too). With ``kv_cache`` each step runs the
    decoder on the newest slot only, against the cached keys/values of the earlier slots
    (reordered with the beams): O(B * n * d) decoder work per user. Without it each step
    re-runs the whole prefix (the earlier implementation, kept as the benchmark's baseline).
    Keys/values of the encoder output are computed once per user either way."""
    users = memory.mask.shape[0]
    n, k = catalogue.digits, max(catalogue.sizes)
    device = memory.mask.device
    codes = torch.zeros(users, 1, 0, dtype=torch.long, device=device)
    scores = torch.zeros(users, 1, device=device)
    past, prev = None, None
    for step in range(n):
        width = codes.shape[1]
        if kv_cache:
            logits, past = model.autoregress_step(memory, prev, step, past)
        else:
            logits = model.autoregress(memory, codes.view(users * width, step))[:, step]
        logp = torch.log_softmax(logits.float(), dim=-1).view(users, width, k)
        padded = torch.cat([codes, codes.new_zeros(users, width, n - step)], dim=2)
        filled = torch.arange(n, device=device) < step
        ok = catalogue.candidates_exist(padded, filled.expand(users, width, n), digit=step)
        total = torch.where(ok, scores[..., None] + logp, torch.full_like(logp, NEG_INF))
        scores, idx = total.view(users, -1).topk(min(beam, width * k), dim=-1)
        parent, code = idx // k, idx % k
        codes = torch.cat([torch.gather(codes, 1, parent[..., None].expand(-1, -1, step)),
                           code[..., None]], dim=2)
        if kv_cache and step < n - 1:
            rows = (torch.arange(users, device=device)[:, None] * width + parent).view(-1)
            past = [(key[rows], value[rows]) for key, value in past]
            prev = code.view(-1)
    groups = catalogue.groups_of(codes)
    groups = torch.where(torch.isfinite(scores), groups, torch.full_like(groups, -1))
    return Beams(codes, scores, groups)


@dataclass
class Ranked:
    """One batch's recommendations: (U, k) items and scores under ``rule``, and the (U, k)
    code groups of the top distinct SIDs (SID-level metrics); -1 = empty slot."""

    items: np.ndarray
    scores: np.ndarray
    groups: np.ndarray


@dataclass(frozen=True)
class SearchOptions:
    """How a batch of users is decoded: the beam width and the decoder's search, with CPD's
    options (``final_step``; the test-time ``fill_order`` and ``fill_digits``, which
    training's validation leaves at their defaults)."""

    beam: int
    decoder: str = "diffusion"  # diffusion (CPD) | autoregressive (beam search) | dense (no search)
    final_step: str = "global"
    fill_order: torch.Tensor | None = None  # a fixed digit order (the ablation); None: by confidence
    fill_digits: int = 1  # digits CPD fills per decoder pass
    cpd_prune: str = "step"  # step: only partial codes some item has | final: the paper's (at the end)
    merge_states: bool = True  # merge beams that reach one state in another order (False: the paper)
    kv_cache: bool = True  # autoregressive: keep decoded digits' keys/values (False: recompute the prefix)

    def to(self, device: torch.device) -> SearchOptions:
        """The same options with ``fill_order`` on ``device``."""
        return self if self.fill_order is None else replace(self, fill_order=self.fill_order.to(device))


@torch.no_grad()
def decode_beams(model: DiffGRM, history: torch.Tensor, history_mask: torch.Tensor,
                 catalogue: CatalogueIndex, options: SearchOptions) -> Beams:
    """Beam search over codes for one batch of histories (CPD or AR)."""
    memory = model.encode(history, history_mask)
    if options.decoder == "autoregressive":
        return ar_beam_search(model, memory, catalogue, options.beam, kv_cache=options.kv_cache)
    if options.decoder == "diffusion":
        return cpd(model, memory, catalogue, options.beam, options.final_step, options.fill_order,
                   options.fill_digits, prune=options.cpd_prune, merge_states=options.merge_states)
    raise ValueError(f"model.decoder: {options.decoder!r} has no beam search")


@torch.no_grad()
def dense_top_items(model: DiffGRM, history: torch.Tensor, history_mask: torch.Tensor,
                    item_group: np.ndarray, k: int) -> Ranked:
    """Dense head: top-k items of the full softmax; SIDs ranked by their best item."""
    logp = torch.log_softmax(model.item_logits(model.encode(history, history_mask)).float(), -1)
    width = min(logp.shape[1], 8 * k)  # enough items to find k distinct codes in practice
    scores, items = logp.topk(width, dim=-1)
    items, scores = items.cpu().numpy(), scores.cpu().numpy()
    groups, _ = first_distinct(item_group[items], scores, k)
    return Ranked(items[:, :k], scores[:, :k], groups)


@torch.no_grad()
def recommend_batch(model: DiffGRM, history: torch.Tensor, history_mask: torch.Tensor,
                    catalogue: CatalogueIndex, options: SearchOptions, k: int,
                    rules: tuple[str, ...] = ("code_prob",)) -> dict[str, Ranked]:
    """Top-k items under each item rule in ``rules`` (one beam search serves them all)."""
    if options.decoder == "dense":
        ranked = dense_top_items(model, history, history_mask, catalogue.item_group, k)
        return {rule: ranked for rule in rules}
    beams = decode_beams(model, history, history_mask, catalogue, options)
    return {rule: rank_items(beams, catalogue, k, rule) for rule in rules}


def first_distinct(groups: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first ``k`` distinct non-negative ids of ``groups`` (rows sorted by score,
    so the first occurrence is the best) and their scores; -1 / -inf pad."""
    users, width = groups.shape
    by_group = np.lexsort((np.broadcast_to(np.arange(width), groups.shape), groups), axis=1)
    g_sorted = np.take_along_axis(groups, by_group, 1)
    first = np.ones_like(g_sorted, dtype=bool)
    first[:, 1:] = g_sorted[:, 1:] != g_sorted[:, :-1]
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, by_group, first, 1)
    keep &= groups >= 0
    pos = np.cumsum(keep, axis=1) - 1
    rows, cols = np.nonzero(keep & (pos < k))
    out_groups = np.full((users, k), -1, dtype=np.int64)
    out_scores = np.full((users, k), -np.inf, dtype=np.float32)
    out_groups[rows, pos[rows, cols]] = groups[rows, cols]
    out_scores[rows, pos[rows, cols]] = scores[rows, cols]
    return out_groups, out_scores


def distinct_sids(beams: Beams, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(U, k) code groups of the top-k distinct SIDs per user (-1 = none), and their scores.

    Beams are sorted by score, so the first occurrence of a code is its best fill order."""
    return first_distinct(beams.groups.cpu().numpy(), beams.scores.float().cpu().numpy(), k)


def rank_items(beams: Beams, catalogue: CatalogueIndex, k: int, rule: str = "code_prob") -> Ranked:
    """Items ranked from the codes the beam search found.

    ``code_prob`` (default): every distinct code the beams reached (not only the first k)
    offers its items, each scored log p(code) + log p(item | code), and the best k items
    win, so a crowded code's unlikely items fall below the next code's likely one and an
    item alone in its code keeps the code's score. ``expand``: the top-k distinct codes
    list all their items (collision-rank order) with the code's score, until k are filled."""
    groups, code_scores = distinct_sids(beams, max(k, beams.groups.shape[1]))  # every code reached
    if rule == "expand":
        items, scores = top_items(groups[:, :k], code_scores[:, :k], catalogue, k)
    elif rule == "code_prob":
        items, scores = top_items(groups, code_scores, catalogue, k, with_prior=True)
    else:
        raise ValueError(f"eval.item_rule: {rule!r} is not one of {ITEM_RULES}")
    return Ranked(items, scores, groups[:, :k])


def top_items(groups: np.ndarray, scores: np.ndarray, catalogue: CatalogueIndex, k: int,
              with_prior: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Expands ranked SIDs (from ``distinct_sids``) to the top-k items per user (-1 = none).

    A SID contributes its first k items in collision-rank order. Without ``with_prior`` they
    all carry the SID's score and keep the SIDs' order; with it each item's score adds
    log p(item | code) and the expanded items are re-ranked by that score."""
    users = groups.shape[0]
    rows, cols = np.nonzero(groups >= 0)  # row-major: score order within each row
    g = groups[rows, cols]
    starts = catalogue.item_offsets[g]
    counts = np.minimum(catalogue.item_offsets[g + 1] - starts, k)
    rep_rows = np.repeat(rows, counts)
    slots = np.repeat(starts, counts) + ragged_positions(counts)
    items = catalogue.item_list[slots]
    item_scores = np.repeat(scores[rows, cols], counts)
    if with_prior:
        item_scores = item_scores + catalogue.item_logp[slots]
        order = np.lexsort((-item_scores, rep_rows))  # stable: ties keep the codes' order
        rep_rows, items, item_scores = rep_rows[order], items[order], item_scores[order]
    pos = ragged_positions(np.bincount(rep_rows, minlength=users))  # rank within the user's row
    ok = pos < k
    out_items = np.full((users, k), -1, dtype=np.int64)
    out_scores = np.full((users, k), -np.inf, dtype=np.float32)
    out_items[rep_rows[ok], pos[ok]] = items[ok]
    out_scores[rep_rows[ok], pos[ok]] = item_scores[ok]
    return out_items, out_scores
