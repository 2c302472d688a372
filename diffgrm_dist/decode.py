"""Generation: CPD beam search (diffusion decoder), AR beam search, and SID -> item mapping.

``Catalogue`` holds what decoding needs to know about the items, built once per catalogue
with memory linear in items and no item x item structure:
- every *partial* pattern that some item has (for each subset of filled digits, the values
  of those digits) in a hash table with O(1) vectorised look-ups, so beams that can no
  longer reach an existing code are pruned whatever order the digits are filled in;
- for every full code, its items (CSR arrays), ranked by collision rank.

CPD (Confidence-guided Parallel Denoising), batched over users x beams with no Python loop
over beams or codes: start fully masked; at each of n steps score every (beam, unfilled
digit, code), add it to the beam's log-probability, keep the global top-B per user, fill
one digit. The encoder output and the cross-attention keys/values are computed once per
user; all beams of a user read them through grouped cross-attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffgrm_dist.model import DiffGRM, Memory

NEG_INF = float("-inf")


# --------------------------------------------------------------------------- hash table


class KeyTable:
    """Open-addressing hash table of int64 keys -> int64 values, with vectorised look-ups.

    Capacity is a power of two >= 2x the keys (so memory is linear in the keys); linear
    probing; ``probes`` is the longest probe sequence any key needed, which bounds the work
    of a look-up (O(1) expected).
    """

    _MULT = np.int64(-7046029254386353131)  # 0x9E3779B97F4A7C15 as signed int64

    def __init__(self, keys: np.ndarray, values: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        capacity = 1 << max(4, int(np.ceil(np.log2(max(1, len(keys)) * 2))))
        self.mask = capacity - 1
        self.keys = np.full(capacity, -1, dtype=np.int64)
        self.values = np.full(capacity, -1, dtype=np.int64)
        pending = np.arange(len(keys))
        slot = self._hash(keys)
        self.probes = 0
        while len(pending):  # each round places, per free slot, the first key that wants it
            self.probes += 1
            want = slot[pending]
            free = self.keys[want] == -1
            cand, cand_slots = pending[free], want[free]
            _, first = np.unique(cand_slots, return_index=True)
            placed = cand[first]
            self.keys[slot[placed]] = keys[placed]
            self.values[slot[placed]] = values[placed]
            rest = np.setdiff1d(pending, placed, assume_unique=True)
            slot[rest] = (slot[rest] + 1) & self.mask
            pending = rest
        self._torch: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((keys * self._MULT) >> np.int64(17)) & self.mask

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Values for ``keys`` (any shape, int64), -1 where absent."""
        device = str(keys.device)
        if device not in self._torch:
            self._torch[device] = (torch.from_numpy(self.keys).to(keys.device),
                                   torch.from_numpy(self.values).to(keys.device))
        table_keys, table_values = self._torch[device]
        slot = ((keys * int(self._MULT)) >> 17) & self.mask
        out = torch.full_like(keys, -1)
        for _ in range(self.probes):
            found = table_keys[slot]
            hit = found == keys
            out = torch.where(hit, table_values[slot], out)
            slot = (slot + 1) & self.mask
        return out

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


# --------------------------------------------------------------------------- catalogue


class Catalogue:
    """Codes of all items: partial-pattern index and code -> items mapping."""

    def __init__(self, codes: np.ndarray, sizes: tuple[int, ...], collision_rank: np.ndarray | None = None) -> None:
        codes = np.asarray(codes, dtype=np.int64)
        self.sizes = tuple(int(s) for s in sizes)
        self.digits = len(self.sizes)
        self.strides = np.concatenate([[1], np.cumprod(self.sizes)[:-1]]).astype(np.int64)
        self.space = int(np.prod(self.sizes, dtype=np.int64))
        if self.space * (1 << self.digits) >= 2 ** 62:
            raise ValueError(f"code space {self.sizes} too large for 64-bit pattern keys")
        # Full codes -> group id -> items (sorted by collision rank).
        full = codes @ self.strides
        rank = collision_rank if collision_rank is not None else np.zeros(len(codes), np.int64)
        order = np.lexsort((np.arange(len(codes)), rank, full))
        unique_full, starts = np.unique(full[order], return_index=True)
        self.item_offsets = np.append(starts, len(order)).astype(np.int64)
        self.item_list = order.astype(np.int64)
        self.num_codes = len(unique_full)
        # Partial patterns: subset bitmask s (1..2^n-1) and the values on s.
        keys = [self._key_np(codes, s) for s in range(1, 1 << self.digits) if s != (1 << self.digits) - 1]
        partial = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
        full_keys = self._key_np(codes[order[starts]], (1 << self.digits) - 1)
        self.table = KeyTable(np.concatenate([partial, full_keys]),
                              np.concatenate([np.full(len(partial), -2, np.int64),
                                              np.arange(len(unique_full), dtype=np.int64)]))
        self.strides_t = torch.from_numpy(self.strides)
        self.bits_t = torch.tensor([1 << d for d in range(self.digits)], dtype=torch.int64)

    def _key_np(self, codes: np.ndarray, subset: int) -> np.ndarray:
        on = np.array([(subset >> d) & 1 for d in range(self.digits)], dtype=np.int64)
        return subset * self.space + codes @ (self.strides * on)

    def pattern_key(self, codes: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """Keys of (…, n) codes restricted to (…, n) bool ``filled``."""
        strides, bits = self.strides_t.to(codes.device), self.bits_t.to(codes.device)
        f = filled.long()
        return (f * bits).sum(-1) * self.space + (codes * strides * f).sum(-1)

    def items_of(self, group: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) into ``item_list`` for code groups."""
        g = group.cpu().numpy()
        return self.item_offsets[g], self.item_offsets[g + 1]

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + self.item_offsets.nbytes + self.item_list.nbytes


# --------------------------------------------------------------------------- CPD


@dataclass
class Beams:
    """Finished beams per user: codes (U, B, n), scores (U, B) sorted, code group (U, B)."""

    codes: torch.Tensor
    scores: torch.Tensor
    groups: torch.Tensor


@torch.no_grad()
def cpd(model: DiffGRM, memory: Memory, catalogue: Catalogue, beam: int,
        final_step: str = "global", fill_order: torch.Tensor | None = None) -> Beams:
    """Confidence-guided Parallel Denoising.

    ``final_step``: ``global`` keeps the global top-B selection to the end (paper);
    ``greedy`` fills each beam's last digit with its best existing code (released code).
    ``fill_order``: a fixed digit order (the ablation's "random fixed order"); None lets
    confidence choose.
    """
    users = memory.mask.shape[0]
    n, k = catalogue.digits, max(catalogue.sizes)
    device = memory.mask.device
    codes = torch.zeros(users, 1, n, dtype=torch.long, device=device)
    filled = torch.zeros(users, 1, n, dtype=torch.bool, device=device)
    scores = torch.zeros(users, 1, device=device)
    digit_code = torch.arange(k, device=device)
    for step in range(n):
        width = codes.shape[1]
        logits = model.denoise(memory, codes.view(-1, n), ~filled.view(-1, n))
        logp = torch.log_softmax(logits.float(), dim=-1).view(users, width, n, k)
        allowed = ~filled[..., None].expand(-1, -1, -1, k)
        if fill_order is not None:
            allowed = allowed & (torch.arange(n, device=device) == fill_order[step])[None, None, :, None]
        # Key of each candidate pattern: the beam's pattern plus (digit, code).
        base = catalogue.pattern_key(codes, filled)  # (U, W)
        strides = catalogue.strides_t.to(device)
        bits = catalogue.bits_t.to(device)
        cand = (base[..., None, None] + bits[:, None] * catalogue.space
                + digit_code[None, :] * strides[:, None])  # (U, W, n, k)
        sizes_ok = digit_code[None, :] < torch.tensor(catalogue.sizes, device=device)[:, None]
        allowed = allowed & sizes_ok
        exists = catalogue.table.lookup(torch.where(allowed, cand, torch.zeros_like(cand))) != -1
        total = torch.where(allowed & exists, scores[..., None, None] + logp,
                            torch.full_like(logp, NEG_INF))
        last = step == n - 1
        if last and final_step == "greedy":
            best, where = total.view(users, width, n * k).max(dim=-1)
            pick_beam = torch.arange(width, device=device).expand(users, width)
            flat = where
            new_scores = best
        else:
            take = min(beam, width * n * k)
            new_scores, idx = total.view(users, -1).topk(take, dim=-1)
            pick_beam, flat = idx // (n * k), idx % (n * k)
        digit, code = flat // k, flat % k
        codes = torch.gather(codes, 1, pick_beam[..., None].expand(-1, -1, n)).clone()
        filled = torch.gather(filled, 1, pick_beam[..., None].expand(-1, -1, n)).clone()
        codes.scatter_(2, digit[..., None], code[..., None])
        filled.scatter_(2, digit[..., None], True)
        scores = new_scores
    order = scores.argsort(dim=1, descending=True)
    scores = torch.gather(scores, 1, order)
    codes = torch.gather(codes, 1, order[..., None].expand(-1, -1, n))
    groups = catalogue.table.lookup(catalogue.pattern_key(codes, torch.ones_like(codes, dtype=torch.bool)))
    groups = torch.where(torch.isfinite(scores), groups, torch.full_like(groups, -1))
    return Beams(codes, scores, groups)


@torch.no_grad()
def ar_beam_search(model: DiffGRM, memory: Memory, catalogue: Catalogue, beam: int) -> Beams:
    """Left-to-right beam search of the autoregressive decoder, constrained to prefixes
    that exist (prefixes are partial patterns too). Each step re-runs the decoder over the
    prefix (n <= 5 slots); keys/values of the encoder output are computed once per user."""
    users = memory.mask.shape[0]
    n, k = catalogue.digits, max(catalogue.sizes)
    device = memory.mask.device
    codes = torch.zeros(users, 1, 0, dtype=torch.long, device=device)
    scores = torch.zeros(users, 1, device=device)
    digit_code = torch.arange(k, device=device)
    strides, bits = catalogue.strides_t.to(device), catalogue.bits_t.to(device)
    for step in range(n):
        width = codes.shape[1]
        logits = model.autoregress(memory, codes.view(users * width, step))[:, step]
        logp = torch.log_softmax(logits.float(), dim=-1).view(users, width, k)
        prefix = codes @ strides[:step] if step else torch.zeros(users, width, dtype=torch.long, device=device)
        cand = (prefix[..., None] + digit_code * strides[step]
                + int(bits[:step + 1].sum()) * catalogue.space)
        ok = (digit_code < catalogue.sizes[step])[None, None].expand(users, width, k)
        exists = catalogue.table.lookup(torch.where(ok, cand, torch.zeros_like(cand))) != -1
        total = torch.where(ok & exists, scores[..., None] + logp, torch.full_like(logp, NEG_INF))
        scores, idx = total.view(users, -1).topk(min(beam, width * k), dim=-1)
        parent, code = idx // k, idx % k
        codes = torch.cat([torch.gather(codes, 1, parent[..., None].expand(-1, -1, step)),
                           code[..., None]], dim=2)
    groups = catalogue.table.lookup(catalogue.pattern_key(codes, torch.ones_like(codes, dtype=torch.bool)))
    groups = torch.where(torch.isfinite(scores), groups, torch.full_like(groups, -1))
    return Beams(codes, scores, groups)


def distinct_sids(beams: Beams, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(U, k) code groups of the top-k distinct SIDs per user (-1 = none), and their scores.

    Beams are sorted by score, so the first occurrence of a code is its best fill order."""
    groups = beams.groups.cpu().numpy()
    scores = beams.scores.float().cpu().numpy()
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


def top_items(groups: np.ndarray, scores: np.ndarray, catalogue: Catalogue,
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """Expands ranked SIDs (from ``distinct_sids``) to the top-k items per user (-1 = none).

    A SID standing for several items (collision rule ``expand``) contributes them in
    collision-rank order, all with the SID's score."""
    users = groups.shape[0]
    rows, cols = np.nonzero(groups >= 0)  # row-major: score order within each row
    g = groups[rows, cols]
    starts = catalogue.item_offsets[g]
    counts = np.minimum(catalogue.item_offsets[g + 1] - starts, k)
    rep_rows = np.repeat(rows, counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    items = catalogue.item_list[np.repeat(starts, counts) + within]
    item_scores = np.repeat(scores[rows, cols], counts)
    pos = np.arange(len(rep_rows)) - np.searchsorted(rep_rows, np.arange(users))[rep_rows]
    ok = pos < k
    out_items = np.full((users, k), -1, dtype=np.int64)
    out_scores = np.full((users, k), -np.inf, dtype=np.float32)
    out_items[rep_rows[ok], pos[ok]] = items[ok]
    out_scores[rep_rows[ok], pos[ok]] = item_scores[ok]
    return out_items, out_scores
