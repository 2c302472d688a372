"""The catalogue index beam search decodes against, built once per catalogue with memory
linear in items and no item x item structure:

- ``Catalogue``: every *partial* pattern that some item has (for each subset of filled
  digits, the values of those digits) in a hash table (``KeyTable``) with O(1) vectorised
  look-ups, so beams that can no longer reach an existing code are pruned whatever order
  the digits are filled in; for every full code, its items (CSR arrays, ``ItemGroups``),
  ranked by collision rank.
- ``LongCodeCatalogue``: an exact inverted-list index for codes whose 2^n digit subsets or
  code space the pattern tables cannot hold.

``build_catalogue`` picks the index; ``catalogue_for`` builds it from the tokenize stage's SIDs.
"""

from __future__ import annotations

import numpy as np
import torch

from diffgrm_dist.data.sids import SidTable

# --------------------------------------------------------------------------- hash table


class KeyTable:
    """Open-addressing hash table of int64 keys -> int64 values, with vectorised look-ups.

    Capacity is a power of two >= 3x the keys (so memory is linear in the keys); linear
    probing; ``probes`` is the longest probe sequence any key needed, which bounds the work
    of a look-up (O(1) expected).
    """

    _MULT = np.int64(-7046029254386353131)  # 0x9E3779B97F4A7C15 as signed int64

    def __init__(self, keys: np.ndarray, values: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        capacity = 1 << max(4, int(np.ceil(np.log2(max(1, len(keys)) * 3))))  # load <= 1/3
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

    def lookup(self, keys: torch.Tensor, sync_free: bool | None = None) -> torch.Tensor:
        """Values for ``keys`` (any shape, int64), -1 where absent.

        ``sync_free`` (default: on a GPU) runs all ``probes`` passes over every key with masks
        instead of shrinking the pending keys: more arithmetic, but no boolean indexing, whose
        output size the host would have to wait for at every pass. Same answers either way."""
        device = str(keys.device)
        if device not in self._torch:
            self._torch[device] = (torch.from_numpy(self.keys).to(keys.device),
                                   torch.from_numpy(self.values).to(keys.device))
        table_keys, table_values = self._torch[device]
        flat = keys.reshape(-1)
        slot = ((flat * int(self._MULT)) >> 17) & self.mask
        out = torch.full_like(flat, -1)
        if sync_free is None:
            sync_free = keys.device.type == "cuda"
        if sync_free:
            done = torch.zeros_like(flat, dtype=torch.bool)
            for _ in range(self.probes):  # a present key sits within `probes` slots of its hash
                found = table_keys[slot]
                hit = (found == flat) & ~done
                out = torch.where(hit, table_values[slot], out)
                done |= hit | (found == -1)  # an empty slot ends the search: absent
                slot = (slot + 1) & self.mask
            return out.view_as(keys)
        pending = torch.arange(len(flat), device=keys.device)
        for _ in range(self.probes):  # most keys resolve at the first probe
            found = table_keys[slot]
            hit = found == flat[pending]
            out[pending[hit]] = table_values[slot[hit]]
            more = ~hit & (found != -1)  # an empty slot ends the search: absent
            pending, slot = pending[more], (slot[more] + 1) & self.mask
            if not len(pending):
                break
        return out.view_as(keys)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


# --------------------------------------------------------------------------- catalogue


class Catalogue:
    """Codes of all items: which partial patterns exist, and which items each code names.

    A partial pattern is a subset S of the digits (a bitmask) with values on S. Subsets
    whose value space is small (at most ``dense_limit`` patterns, e.g. any 3 of 4 digits
    of 256 codes: 2^24) get a packed bitset, indexed directly; larger ones (the full code)
    go into a hash table of the patterns that occur. Either way a look-up is O(1), and
    memory is a few MB of bitsets plus a table linear in items.

    ``candidates_exist`` asks, per beam, about every code of every unfilled digit: for a
    beam with digits S filled and an unfilled digit j, the codes of j that some item has
    together with the beam's values on S. Where it fits ``child_budget`` bytes (smallest
    first), that answer is stored as one bit row per pattern on S (``size_j`` bits): one
    gather of the row's bytes per (beam, digit), instead of ``size_j`` pattern look-ups.
    """

    def __init__(self, codes: np.ndarray, sizes: tuple[int, ...],
                 collision_rank: np.ndarray | None = None, train_count: np.ndarray | None = None,
                 dense_limit: int = 1 << 26, child_budget: int = 64 << 20) -> None:
        codes = np.asarray(codes, dtype=np.int64)
        self.sizes = tuple(int(s) for s in sizes)
        n = self.digits = len(self.sizes)
        subsets = 1 << n
        full = subsets - 1
        # Within-subset strides: digit d of subset S is scaled by the sizes of S's lower digits.
        self.subset_strides = np.zeros((subsets, n), dtype=np.int64)
        self.subset_space = np.ones(subsets, dtype=np.int64)
        for s in range(subsets):
            for d in range(n):
                if s >> d & 1:
                    self.subset_strides[s, d] = self.subset_space[s]
                    self.subset_space[s] *= self.sizes[d]
        if int(self.subset_space[full]) >= 2 ** 56:
            raise ValueError(f"code space {self.sizes} too large for 64-bit pattern keys")
        self.dense = (self.subset_space <= dense_limit) & (np.arange(subsets) != full)
        self.dense[0] = False
        self.bit_offset = np.zeros(subsets, dtype=np.int64)
        self.bit_offset[self.dense] = np.concatenate([[0], np.cumsum(self.subset_space[self.dense])[:-1]])
        bits = np.zeros(int(self.subset_space[self.dense].sum()), dtype=bool)
        hashed: list[np.ndarray] = []
        for s in range(1, full):
            index = codes @ self.subset_strides[s]
            if self.dense[s]:
                bits[self.bit_offset[s] + index] = True
            else:
                hashed.append(np.unique(self.pattern_key(s, index)))
        self.bitset = np.packbits(bits, bitorder="little") if len(bits) else np.zeros(1, np.uint8)
        full_index = codes @ self.subset_strides[full]
        _, group = np.unique(full_index, return_inverse=True)  # group ids in code order
        self.items = ItemGroups(group, collision_rank, train_count)
        unique_full = np.unique(full_index)
        partial = np.concatenate(hashed) if hashed else np.zeros(0, np.int64)
        self.table = KeyTable(np.concatenate([partial, self.pattern_key(full, unique_full)]),
                              np.concatenate([np.full(len(partial), -2, np.int64),
                                              np.arange(len(unique_full), dtype=np.int64)]))
        self._build_child_rows(codes, child_budget)
        self._t: dict[str, dict[str, torch.Tensor]] = {}

    def _build_child_rows(self, codes: np.ndarray, budget: int) -> None:
        """``child_rows``: for (filled subset S, digit j not in S), a block of bit rows, one
        per pattern on S (row = its within-subset index), bit c set if some item has that
        pattern and code c at digit j; ``child_offset[S, j]`` its first byte (-1: not
        stored, answered by ``lookup``); rows of digit j are ``row_bytes[j]`` bytes."""
        n, subsets = self.digits, 1 << self.digits
        self.row_bytes = np.array([(size + 7) // 8 for size in self.sizes], dtype=np.int64)
        blocks = sorted((int(self.subset_space[s] * self.row_bytes[j]), s, j)
                        for s in range(subsets) for j in range(n) if not s >> j & 1)
        self.child_offset = np.full((subsets, n), -1, dtype=np.int64)
        total = 0
        for nbytes, s, j in blocks:
            if total + nbytes > budget:
                break
            self.child_offset[s, j] = total
            total += nbytes
        self.child_rows = np.zeros(total + int(self.row_bytes.max()), dtype=np.uint8)  # tail: reads past the end
        for s in np.flatnonzero((self.child_offset >= 0).any(axis=1)):
            row, rows = codes @ self.subset_strides[s], int(self.subset_space[s])  # each item's row, once per S
            for j in np.flatnonzero(self.child_offset[s] >= 0):
                lo = self.child_offset[s, j]
                bits = np.zeros((rows, 8 * self.row_bytes[j]), dtype=bool)
                bits[row, codes[:, j]] = True
                self.child_rows[lo:lo + rows * self.row_bytes[j]] = np.packbits(bits, axis=1, bitorder="little").ravel()

    def __getattr__(self, name: str):  # item_offsets, item_list, item_logp, item_group, num_codes
        if name in ItemGroups.FIELDS:
            return getattr(self.__dict__["items"], name)
        raise AttributeError(name)

    def state_key(self, codes: torch.Tensor, filled: torch.Tensor, beam: torch.Tensor,
                  digit: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Identity of the state (filled digits and their codes) each candidate leads to:
        candidate (beam, digit, code) of beams ``codes``/``filled`` (U, W, n)."""
        t = self.tensors(codes.device)
        full = t["subset_strides"][-1]
        parent_codes = codes.gather(1, beam[..., None].expand(-1, -1, codes.shape[2]))
        parent_filled = filled.gather(1, beam[..., None].expand(-1, -1, codes.shape[2]))
        index = (parent_codes * parent_filled.long() * full).sum(-1) + code * full[digit]
        subset = self.subset_of(parent_filled) | t["bits"][digit]
        return self.pattern_key(subset, index)

    def pattern_key(self, subset, index):
        """One int64 naming a pattern: its subset bitmask and its within-subset index."""
        return subset * int(self.subset_space[-1]) + index

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        key = str(device)
        if key not in self._t:
            self._t[key] = {name: torch.from_numpy(getattr(self, name)).to(device) for name in
                            ("subset_strides", "dense", "bit_offset", "bitset", "child_offset", "row_bytes",
                             "child_rows")}
            self._t[key]["bits"] = torch.tensor([1 << d for d in range(self.digits)], device=device)
            self._t[key]["sizes"] = torch.tensor(self.sizes, device=device)
        return self._t[key]

    def lookup(self, subset: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """-1 if the pattern (subset bitmask, within-subset index) exists in no item, else
        its code group (full codes) or -2 (partial patterns); flat (N,) results."""
        t = self.tensors(index.device)
        subset, index = subset.reshape(-1), index.reshape(-1)
        dense = t["dense"][subset]
        out = torch.full_like(index, -1)
        at = dense.nonzero().squeeze(1)  # bitset look-ups only where the subset has one
        if len(at):
            position = t["bit_offset"][subset[at]] + index[at]
            bit = (t["bitset"][position >> 3] >> (position & 7).to(torch.uint8)) & 1
            out[at] = torch.where(bit.bool(), -2, -1)
        at = (~dense).nonzero().squeeze(1)  # the rest in the hash table
        if len(at):
            out[at] = self.table.lookup(self.pattern_key(subset[at], index[at]))
        return out

    def subset_of(self, filled: torch.Tensor) -> torch.Tensor:
        return (filled.long() * self.tensors(filled.device)["bits"]).sum(-1)

    def index_of(self, codes: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        strides = self.tensors(codes.device)["subset_strides"][self.subset_of(filled)]
        return (codes * strides * filled.long()).sum(-1)

    def groups_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Code group of full codes (..., n); -1 where no item has the code."""
        full = torch.ones_like(codes, dtype=torch.bool)
        return self.lookup(self.subset_of(full), self.index_of(codes, full)).view(codes.shape[:-1])

    def candidates_exist(self, codes: torch.Tensor, filled: torch.Tensor, digit: int | None = None) -> torch.Tensor:
        """For beams (..., n) with ``filled`` digits: (..., n, K) whether filling digit j with
        code c gives a pattern some item has (False where j is filled or c out of range).
        With ``digit``, only that digit's (..., K): AR search fills one known digit a step."""
        t = self.tensors(codes.device)
        k = max(self.sizes)
        digits = torch.arange(self.digits if digit is None else digit + 1, device=codes.device)[digit:]
        code = torch.arange(k, device=codes.device)
        ok = ~filled[..., digits, None] & (code < t["sizes"][digits, None])  # (..., D, K)
        subset = self.subset_of(filled)
        offset = t["child_offset"][subset[..., None], digits]  # (..., D): -1 where not stored
        row = self.index_of(codes, filled)
        start = torch.where(offset >= 0, offset + row[..., None] * t["row_bytes"][digits], 0)
        width = int(self.row_bytes.max())
        span = t["child_rows"][start[..., None] + torch.arange(width, device=codes.device)]
        shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
        exists = ((span[..., None] >> shifts) & 1).bool().flatten(-2)[..., :k] & (offset >= 0)[..., None]
        rest = (offset < 0) & ok.any(-1)  # (beam, digit) pairs whose block is not stored
        if rest.any():
            at = rest.nonzero(as_tuple=True)
            beam_at, digit_at = at[:-1], digits[at[-1]]
            new_subset = subset[beam_at] | t["bits"][digit_at]  # (P,)
            strides = t["subset_strides"][new_subset]  # (P, n): strides in the new subsets
            base = (codes[beam_at] * strides * filled[beam_at].long()).sum(-1)
            own = strides.gather(1, digit_at[:, None])  # digit j's stride in S+j
            index = base[:, None] + own * torch.minimum(code, t["sizes"][digit_at, None] - 1)  # in range
            exists[at] = self.lookup(new_subset[:, None].expand_as(index), index).view(index.shape) != -1
        exists = exists & ok
        return exists if digit is None else exists[..., 0, :]

    def candidate_destinations(self, codes: torch.Tensor, filled: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``candidates_exist`` and no destinations: with codes this short, every beam ends
        on its own code anyway, so ``cpd`` has nothing to merge early."""
        return self.candidates_exist(codes, filled), None

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + self.bitset.nbytes + self.child_rows.nbytes + self.items.nbytes


class ItemGroups:
    """Items grouped by full code: group id -> items (CSR arrays, collision-rank order),
    each item's group, and log p(item | its code)."""

    FIELDS = ("item_offsets", "item_list", "item_logp", "item_group", "num_codes")

    def __init__(self, group: np.ndarray, collision_rank: np.ndarray | None = None,
                 train_count: np.ndarray | None = None) -> None:
        group = np.asarray(group, dtype=np.int64)
        rank = collision_rank if collision_rank is not None else np.zeros(len(group), np.int64)
        order = np.lexsort((np.arange(len(group)), rank, group))
        self.num_codes = int(group.max()) + 1 if len(group) else 0
        starts = np.searchsorted(group[order], np.arange(self.num_codes))
        self.item_offsets = np.append(starts, len(order)).astype(np.int64)
        self.item_list = order.astype(np.int64)
        self.item_group = group
        self.item_logp = self._item_log_prior(train_count)

    def _item_log_prior(self, train_count: np.ndarray | None) -> np.ndarray:
        """log p(item | its code) for ``item_list``, from training counts smoothed as
        (count + 1) / (code total + items in the code): an item alone in its code gets
        log 1 = 0, and without counts the items of a code share it uniformly."""
        per_code = np.diff(self.item_offsets)
        counts = (np.zeros(len(self.item_list)) if train_count is None
                  else np.asarray(train_count, dtype=np.float64)[self.item_list])
        totals = np.add.reduceat(counts, self.item_offsets[:-1]) if len(counts) else counts
        return (np.log(counts + 1.0) - np.repeat(np.log(totals + per_code), per_code)).astype(np.float32)

    @property
    def nbytes(self) -> int:
        return self.item_offsets.nbytes + self.item_list.nbytes + self.item_logp.nbytes + self.item_group.nbytes


class LongCodeCatalogue:
    """The catalogue index for long codes (n digits whose 2^n subsets, or whose code space,
    the pattern tables of ``Catalogue`` cannot hold): same interface, exact answers.

    A beam's candidates come from the items it still matches: the inverted list of one of
    its filled (digit, code) pairs, the shortest, filtered by its other filled digits; the
    codes those items have at each unfilled digit are the fills that keep the beam
    reachable. Memory: the codes plus one inverted list per digit (O(items * n)); work per
    beam: the list's length times n. States and full codes are named by 64-bit hashes
    (full codes checked exactly after the look-up).
    """

    BLOCK = 1 << 24  # elements of a (beams x list x digits) block in ``candidates_exist``

    def __init__(self, codes: np.ndarray, sizes: tuple[int, ...],
                 collision_rank: np.ndarray | None = None, train_count: np.ndarray | None = None,
                 seed: int = 0) -> None:
        codes = np.asarray(codes, dtype=np.int64)
        self.sizes = tuple(int(s) for s in sizes)
        n = self.digits = len(self.sizes)
        k = max(self.sizes)
        # Groups numbered as Catalogue numbers them (digit 0 varies fastest).
        unique, group = np.unique(codes[:, ::-1], axis=0, return_inverse=True)
        unique = np.ascontiguousarray(unique[:, ::-1])
        self.items = ItemGroups(group.reshape(-1), collision_rank, train_count)
        self.codes = unique  # one row per code group
        # Inverted lists over code groups: postings of (digit d, code c) at
        # post_offsets[d * k + c] : post_offsets[d * k + c + 1].
        keys = (np.arange(n) * k)[None, :] + unique  # (groups, n)
        flat = keys.T.reshape(-1)
        order = np.argsort(flat, kind="stable")
        self.postings = np.tile(np.arange(len(unique)), n)[order]
        self.post_offsets = np.searchsorted(flat[order], np.arange(n * k + 1)).astype(np.int64)
        lengths = np.diff(self.post_offsets)
        self.occurs = (lengths > 0).reshape(n, k)
        # (digit, code) pairs only one code group has: a beam filling it knows its code.
        self.single = np.where(lengths == 1, self.postings[np.minimum(self.post_offsets[:-1], len(self.postings) - 1)],
                               -1).reshape(n, k).astype(np.int64)
        rng = np.random.default_rng(seed)
        self.mult = (rng.integers(1, 2 ** 62, n, dtype=np.int64) | 1)  # odd 64-bit multipliers
        hashes = self._hash_np(unique)
        if len(np.unique(hashes)) != len(hashes):
            raise ValueError("64-bit hashes of two codes coincide; build with another seed")
        self.table = KeyTable(hashes, np.arange(len(unique), dtype=np.int64))
        self._t: dict[str, dict[str, torch.Tensor]] = {}

    def __getattr__(self, name: str):
        if name in ItemGroups.FIELDS:
            return getattr(self.__dict__["items"], name)
        raise AttributeError(name)

    def _hash_np(self, codes: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((codes + 1) * self.mult).sum(-1) & np.int64(2 ** 62 - 1)

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        key = str(device)
        if key not in self._t:
            self._t[key] = {name: torch.from_numpy(getattr(self, name)).to(device)
                            for name in ("codes", "postings", "post_offsets", "occurs", "single", "mult")}
            self._t[key]["sizes"] = torch.tensor(self.sizes, device=device)
        return self._t[key]

    def _hash(self, codes: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        t = self.tensors(codes.device)
        return ((codes + 1) * filled.long() * t["mult"]).sum(-1) & (2 ** 62 - 1)  # int64 wraps

    def groups_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Code group of full codes (..., n); -1 where no item has the code."""
        t = self.tensors(codes.device)
        group = self.table.lookup(self._hash(codes, torch.ones_like(codes, dtype=torch.bool)))
        same = (t["codes"][group.clamp(min=0)] == codes).all(-1)
        return torch.where((group >= 0) & same, group, torch.full_like(group, -1))

    def state_key(self, codes: torch.Tensor, filled: torch.Tensor, beam: torch.Tensor,
                  digit: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """64-bit hash of the state each candidate (beam, digit, code) leads to."""
        t = self.tensors(codes.device)
        parent_codes = codes.gather(1, beam[..., None].expand(-1, -1, codes.shape[2]))
        parent_filled = filled.gather(1, beam[..., None].expand(-1, -1, codes.shape[2]))
        return (self._hash(parent_codes, parent_filled) + (code + 1) * t["mult"][digit]) & (2 ** 62 - 1)

    def candidates_exist(self, codes: torch.Tensor, filled: torch.Tensor, digit: int | None = None) -> torch.Tensor:
        """For beams (..., n) with ``filled`` digits: (..., n, K) whether filling digit j with
        code c leaves some item the beam matches (False where j is filled or c out of range).
        With ``digit``, only that digit's (..., K)."""
        return self._candidates(codes, filled, digit, destinations=False)[0]

    def candidate_destinations(self, codes: torch.Tensor, filled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``candidates_exist`` and, per candidate fill, the code group it leaves the beam
        with when exactly one remains (else -1): beams known to reach the same code can be
        merged before they finish (see ``cpd``)."""
        return self._candidates(codes, filled, None, destinations=True)

    def _candidates(self, codes: torch.Tensor, filled: torch.Tensor, digit: int | None,
                    destinations: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = self.tensors(codes.device)
        n, k = self.digits, max(self.sizes)
        digits = torch.arange(n if digit is None else digit + 1, device=codes.device)[digit:]
        d = len(digits)
        shape = codes.shape[:-1]
        codes, filled = codes.reshape(-1, n), filled.reshape(-1, n)
        exists = t["occurs"][digits].expand(len(codes), d, k).clone()  # beams with nothing filled
        dest = t["single"][digits].expand(len(codes), d, k).clone() if destinations else None
        some = filled.any(-1).nonzero().squeeze(1)
        if len(some):
            key = torch.arange(n, device=codes.device) * k + codes[some]  # (R, n)
            length = torch.where(filled[some], t["post_offsets"][key + 1] - t["post_offsets"][key],
                                 torch.full_like(key, torch.iinfo(torch.int64).max))
            shortest, pick = length.min(-1)
            start = t["post_offsets"][key.gather(1, pick[:, None]).squeeze(1)]
            cap = max(1, int(shortest.max()))
            rows = max(1, self.BLOCK // (cap * n))  # (rows, cap, n) compares per block
            for lo in range(0, len(some), rows):
                hi = min(lo + rows, len(some))
                span = torch.arange(cap, device=codes.device)
                valid = span < shortest[lo:hi, None]
                groups = t["postings"][(start[lo:hi, None] + span).clamp(max=len(self.postings) - 1)]
                item_codes = t["codes"][groups]  # (r, cap, n)
                beam_codes, beam_filled = codes[some[lo:hi]], filled[some[lo:hi]]
                match = valid & ((item_codes == beam_codes[:, None]) | ~beam_filled[:, None]).all(-1)
                slot = torch.arange(d, device=codes.device) * k + item_codes[..., digits]  # (r, cap, D)
                hit = match[..., None].expand_as(slot)
                beam_row = torch.arange(hi - lo, device=codes.device)[:, None, None].expand_as(slot)
                where = (beam_row[hit], slot[hit])
                count = torch.zeros(hi - lo, d * k, dtype=torch.int32, device=codes.device)
                count.index_put_(where, torch.ones_like(where[0], dtype=torch.int32), accumulate=True)
                exists[some[lo:hi]] = (count > 0).view(-1, d, k)
                if destinations:
                    group = torch.full((hi - lo, d * k), -1, dtype=torch.int64, device=codes.device)
                    group[where] = groups[:, :, None].expand_as(slot)[hit]
                    dest[some[lo:hi]] = torch.where(count == 1, group, -1).view(-1, d, k)
        code = torch.arange(k, device=codes.device)
        exists &= ~filled[:, digits, None] & (code < t["sizes"][digits, None])
        exists = exists.view(*shape, d, k)
        if dest is not None:
            dest = torch.where(exists.view(-1, d, k), dest, -1).view(*shape, d, k)
        return (exists, dest) if digit is None else (exists[..., 0, :], None)

    @property
    def nbytes(self) -> int:
        return (self.codes.nbytes + self.postings.nbytes + self.post_offsets.nbytes + self.table.nbytes
                + self.items.nbytes)


# What beam search and ranking need of a catalogue, which both indexes provide: sizes,
# candidates_exist, candidate_destinations (destinations None where the index cannot tell),
# groups_of, and the item tables item_offsets / item_list / item_logp / item_group.
CatalogueIndex = Catalogue | LongCodeCatalogue


def build_catalogue(codes: np.ndarray, sizes: tuple[int, ...], collision_rank: np.ndarray | None = None,
                    train_count: np.ndarray | None = None) -> CatalogueIndex:
    """The pattern-table index where its 2^n subsets and code space fit (n <= 8 digits,
    code space < 2^56), else the inverted-list index for long codes."""
    if len(sizes) <= 8 and float(np.prod([float(s) for s in sizes])) < 2.0 ** 56:
        return Catalogue(codes, sizes, collision_rank, train_count)
    return LongCodeCatalogue(codes, sizes, collision_rank, train_count)


def catalogue_for(sids: SidTable) -> CatalogueIndex:
    return build_catalogue(sids.codes, sids.sizes, sids.collision_rank, sids.train_count)
