"""CPD / AR beam search, the catalogue index, item mapping and metrics, by hand and by brute force."""

import itertools

import numpy as np
import pytest
import torch

from diffgrm_dist.core.config import ModelConfig
from diffgrm_dist.decode.catalogue import Catalogue, LongCodeCatalogue, build_catalogue
from diffgrm_dist.decode.search import ar_beam_search, cpd, distinct_sids, top_items
from diffgrm_dist.evaluate.metrics import most_frequent, per_user, selection_score
from diffgrm_dist.model.network import DiffGRM, SidSpec

SIZES = (8, 8, 8)


def tiny_model(decoder_layers=2):
    torch.manual_seed(0)
    return DiffGRM(ModelConfig(d_model=32, heads=2, ffn=64, decoder_layers=decoder_layers, dropout=0.0),
                   SidSpec(SIZES, 6)).eval()


def memory_for(model, users=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, 8, (users, 6, 3), generator=g)
    mask = torch.ones(users, 6, dtype=torch.bool)
    mask[:, :2] = False
    return model.encode(history, mask)


@pytest.fixture(scope="module")
def codes():
    rng = np.random.default_rng(0)
    return np.unique(rng.integers(0, 8, (25, 3)), axis=0)


@pytest.mark.parametrize("dense_limit", [1 << 26, 1])
def test_catalogue_knows_exactly_the_existing_partial_patterns(codes, dense_limit):
    cat = Catalogue(codes, SIZES, dense_limit=dense_limit)
    existing = {(s, tuple(c[d] if s >> d & 1 else 0 for d in range(3)))
                for c in codes.tolist() for s in range(1, 8)}
    for s in range(1, 8):
        filled = torch.tensor([bool(s >> d & 1) for d in range(3)])
        for vals in itertools.product(range(8), repeat=3):
            if any(vals[d] for d in range(3) if not s >> d & 1):
                continue
            found = cat.lookup(cat.subset_of(filled), cat.index_of(torch.tensor(vals), filled)).item() != -1
            assert found == ((s, vals) in existing), (s, vals)


@pytest.mark.parametrize("budget", [64 << 20, 40, 0])
def test_candidates_exist_from_stored_child_rows_equals_brute_force(budget):
    """Stored bit rows (all, the smallest blocks only, none) answer as brute force over the
    items, for digits of uneven sizes (rows of 1 and 2 bytes) and every filled subset."""
    sizes = (5, 12, 3, 9)
    rng = np.random.default_rng(1)
    codes = np.unique(np.stack([rng.integers(0, s, 60) for s in sizes], axis=1), axis=0)
    cat = Catalogue(codes, sizes, child_budget=budget)
    stored = int((cat.child_offset >= 0).sum())
    assert (stored == 32) if budget == 64 << 20 else (0 < stored < 32) if budget == 40 else stored == 0
    beams = np.concatenate([codes[rng.integers(0, len(codes), 30)],
                            np.stack([rng.integers(0, s, 30) for s in sizes], axis=1)])
    for subset in range(16):
        on = np.array([bool(subset >> d & 1) for d in range(4)])
        expected = np.zeros((len(beams), 4, 12), dtype=bool)
        for b, beam in enumerate(beams):
            match = (codes[:, on] == beam[on]).all(axis=1)
            for d in np.flatnonzero(~on):
                expected[b, d, codes[match, d]] = True
        filled = torch.from_numpy(on).expand(len(beams), 4)
        got = cat.candidates_exist(torch.from_numpy(beams), filled)
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=f"subset {subset}")
        for d in range(4):
            assert torch.equal(cat.candidates_exist(torch.from_numpy(beams), filled, digit=d), got[:, d])


def test_cpd_returns_only_existing_codes_sorted(codes):
    model, cat = tiny_model(), Catalogue(codes, SIZES)
    existing = set(map(tuple, codes.tolist()))
    for final_step in ("global", "greedy"):
        beams = cpd(model, memory_for(model), cat, beam=16, final_step=final_step)
        kept = beams.groups >= 0
        assert all(tuple(c) in existing for c in beams.codes[kept].tolist())
        assert (beams.scores[:, 1:] <= beams.scores[:, :-1]).all()
        groups, scores = distinct_sids(beams, 10)
        for row, row_scores in zip(groups, scores):
            real = row[row >= 0]
            assert len(set(real.tolist())) == len(real)  # no code twice
            assert (np.diff(row_scores[row >= 0]) <= 0).all()


def best_path_scores(model, mem, codes, fill_digits=1, orders=None):
    """Brute force: each code's best score over every fill order (or over ``orders``),
    filling ``fill_digits`` digits per decoder pass (each pass's log-probabilities given the
    digits filled before)."""
    n = codes.shape[1]
    best = {}
    for code in codes.tolist():
        for order in orders or itertools.permutations(range(n)):
            filled = torch.zeros(1, n, dtype=torch.bool)
            total = 0.0
            for start in range(0, n, fill_digits):
                logp = torch.log_softmax(model.denoise(mem, torch.tensor([code]), ~filled), -1)
                for digit in order[start:start + fill_digits]:
                    total += logp[0, digit, code[digit]].item()
                    filled[0, digit] = True
            best[tuple(code)] = max(best.get(tuple(code), -np.inf), total)
    return sorted(best.items(), key=lambda kv: -kv[1])


def test_cpd_with_a_huge_beam_equals_exhaustive_scoring(codes):
    """With B above every path count, CPD keeps every (code, fill order) path, so its
    deduplicated ranking equals the best path score of every code, computed by brute force."""
    model, cat = tiny_model(), Catalogue(codes, SIZES)
    memory = memory_for(model, users=2)
    beams = cpd(model, memory, cat, beam=100_000)
    groups, scores = distinct_sids(beams, len(codes))

    for user in range(2):
        expected = best_path_scores(model, memory.select(torch.tensor([user])), codes)
        got_codes = [tuple(codes[cat.item_list[cat.item_offsets[g]]].tolist()) for g in groups[user]]
        assert [c for c, _ in expected] == got_codes
        np.testing.assert_allclose(scores[user], [v for _, v in expected], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", [(2, 0, 1), (1, 2, 0)])
def test_random_fixed_order_fills_in_that_order(codes, order):
    """With a huge beam and a fixed order, each code's score is the one path that fills the
    digits in exactly that order (brute force), not its best over all orders: the scores
    differ from the free CPD's, and the two fixed orders differ from each other."""
    model, cat = tiny_model(), Catalogue(codes, SIZES)
    memory = memory_for(model, users=1)
    beams = cpd(model, memory, cat, beam=100_000, fill_order=torch.tensor(order))
    groups, scores = distinct_sids(beams, len(codes))
    expected = best_path_scores(model, memory, codes, orders=[order])
    got_codes = [tuple(codes[cat.item_list[cat.item_offsets[g]]].tolist()) for g in groups[0]]
    assert [c for c, _ in expected] == got_codes
    np.testing.assert_allclose(scores[0], [v for _, v in expected], rtol=1e-4, atol=1e-4)
    free = dict(best_path_scores(model, memory, codes))
    assert any(free[c] > v + 1e-4 for c, v in expected)  # some code had a better order


def test_ar_beam_search_with_a_huge_beam_equals_exhaustive_left_to_right(codes):
    model, cat = tiny_model(), Catalogue(codes, SIZES)
    memory = memory_for(model, users=1)
    beams = ar_beam_search(model, memory, cat, beam=100_000)
    groups, scores = distinct_sids(beams, len(codes))
    totals = []
    for code in codes.tolist():
        logp = torch.log_softmax(model.autoregress(memory, torch.tensor([code[:2]])), -1)[0]
        totals.append(sum(logp[d, code[d]].item() for d in range(3)))
    expected = np.sort(np.array(totals))[::-1]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-4, atol=1e-4)


def test_ar_step_with_kv_cache_equals_the_teacher_forced_decoder():
    model = tiny_model(decoder_layers=3)
    memory = memory_for(model, users=3)
    codes = torch.randint(0, 8, (3, 3), generator=torch.Generator().manual_seed(1))
    full = model.autoregress(memory, codes[:, :2])
    past, prev = None, None
    for step in range(3):
        logits, past = model.autoregress_step(memory, prev, step, past)
        torch.testing.assert_close(logits, full[:, step], rtol=1e-5, atol=1e-5)
        prev = codes[:, step]


@pytest.mark.parametrize("beam", [1, 5, 32, 100_000])
def test_ar_beam_search_with_kv_cache_equals_re_running_the_prefix(codes, beam):
    model, cat = tiny_model(), Catalogue(codes, SIZES)
    memory = memory_for(model, users=4)
    cached = ar_beam_search(model, memory, cat, beam=beam)
    rerun = ar_beam_search(model, memory, cat, beam=beam, kv_cache=False)
    torch.testing.assert_close(cached.scores, rerun.scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached.codes, rerun.codes) and torch.equal(cached.groups, rerun.groups)


def test_ar_kv_cache_handles_digits_of_different_sizes():
    sizes = (8, 8, 3)  # an extra digit smaller than the others
    torch.manual_seed(0)
    model = DiffGRM(ModelConfig(d_model=32, heads=2, ffn=64, decoder_layers=2, dropout=0.0),
                    SidSpec(sizes, 6)).eval()
    rng = np.random.default_rng(1)
    codes = np.unique(np.stack([rng.integers(0, 8, 30), rng.integers(0, 8, 30), rng.integers(0, 3, 30)], 1), axis=0)
    cat = Catalogue(codes, sizes)
    history = torch.from_numpy(codes[rng.integers(0, len(codes), (3, 6))])  # (3 users, 6 slots, 3 digits)
    memory = model.encode(history, torch.ones(3, 6, dtype=torch.bool))
    cached, rerun = (ar_beam_search(model, memory, cat, beam=12, kv_cache=c) for c in (True, False))
    torch.testing.assert_close(cached.scores, rerun.scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached.codes, rerun.codes)


def test_cpd_one_digit_per_pass_is_the_default(codes):
    model, cat = tiny_model(), Catalogue(codes, SIZES)
    memory = memory_for(model)
    a, b = cpd(model, memory, cat, beam=16), cpd(model, memory, cat, beam=16, fill_digits=1)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("m", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_multi_digit_fill_with_a_huge_beam_equals_exhaustive_scoring(codes, m):
    """Filling m digits per pass: a code's score is, over every way of splitting the digits
    into passes of m (the last may be shorter), the best sum of each pass's log-probabilities
    of the digits it fills, given the digits filled before it."""
    model, cat = tiny_model(), Catalogue(codes, SIZES)
    memory = memory_for(model, users=2)
    beams = cpd(model, memory, cat, beam=100_000, fill_digits=m)
    groups, scores = distinct_sids(beams, len(codes))
    for user in range(2):
        expected = best_path_scores(model, memory.select(torch.tensor([user])), codes, m)
        got_codes = [tuple(codes[cat.item_list[cat.item_offsets[g]]].tolist()) for g in groups[user]]
        np.testing.assert_allclose(scores[user], [v for _, v in expected], rtol=1e-4, atol=1e-4)
        assert set(got_codes) == set(c for c, _ in expected)


@pytest.mark.parametrize("m, passes", [(1, 3), (2, 2), (3, 1), (8, 1)])
def test_multi_digit_fill_runs_ceil_n_over_m_decoder_passes(codes, m, passes, monkeypatch):
    model, cat = tiny_model(), Catalogue(codes, SIZES)
    calls = []
    real = model.denoise
    monkeypatch.setattr(model, "denoise", lambda *a: calls.append(1) or real(*a))
    beams = cpd(model, memory_for(model), cat, beam=16, fill_digits=m)
    assert len(calls) == passes
    existing = set(map(tuple, codes.tolist()))
    assert all(tuple(c) in existing for c in beams.codes[beams.groups >= 0].tolist())
    assert (beams.scores[:, 1:] <= beams.scores[:, :-1]).all()


def test_long_code_index_answers_as_the_pattern_tables(codes):
    """The inverted-list index (for long codes) against the pattern-table index, on beams
    with every subset of digits filled."""
    table, lists = Catalogue(codes, SIZES), LongCodeCatalogue(codes, SIZES)
    rng = np.random.default_rng(3)
    beams = torch.from_numpy(np.concatenate([codes[rng.integers(0, len(codes), 40)],
                                             rng.integers(0, 8, (40, 3))]))
    for s in range(8):
        filled = torch.tensor([bool(s >> d & 1) for d in range(3)]).expand(len(beams), 3)
        assert torch.equal(table.candidates_exist(beams, filled), lists.candidates_exist(beams, filled)), s
        for index in (table, lists):  # one digit's candidates, as the AR search asks
            for digit in range(3):
                assert torch.equal(index.candidates_exist(beams, filled, digit=digit),
                                   index.candidates_exist(beams, filled)[:, digit])
    assert torch.equal(table.groups_of(beams), lists.groups_of(beams))
    np.testing.assert_array_equal(table.item_list, lists.item_list)
    model, memory = tiny_model(), memory_for(tiny_model())
    for decode in (lambda c: cpd(model, memory, c, beam=16, merge_destinations=False),
                   lambda c: ar_beam_search(model, memory, c, beam=16)):
        a, b = decode(table), decode(lists)
        torch.testing.assert_close(a.scores, b.scores)
        assert torch.equal(a.groups, b.groups)


def test_cpd_decodes_32_digit_codes_to_existing_items():
    sizes = (16,) * 32
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (500, 32))
    catalogue = build_catalogue(codes, sizes)
    assert isinstance(catalogue, LongCodeCatalogue)
    torch.manual_seed(0)
    model = DiffGRM(ModelConfig(d_model=32, heads=2, ffn=64, decoder_layers=1, dropout=0.0),
                    SidSpec(sizes, 6)).eval()
    history = torch.from_numpy(codes[rng.integers(0, 500, (3, 6))])
    memory = model.encode(history, torch.ones(3, 6, dtype=torch.bool))
    existing = set(map(tuple, codes.tolist()))
    for m in (1, 4, 32):
        beams = cpd(model, memory, catalogue, beam=8, fill_digits=m)
        live = torch.isfinite(beams.scores)
        assert live[:, 0].all() and torch.equal(live, beams.groups >= 0)  # finished beams are real codes
        assert all(tuple(c) in existing for c in beams.codes[live].tolist())
    beams = ar_beam_search(model, memory, catalogue, beam=8)
    assert (beams.groups >= 0).all()  # left to right, 8 distinct prefixes stay 8 distinct codes
    # Without merging beams that can only reach one code, CPD's 8 beams fill out orders of
    # the same code; merged, they keep several distinct codes.
    unmerged = cpd(model, memory, catalogue, beam=8, merge_destinations=False)
    merged = cpd(model, memory, catalogue, beam=8)
    distinct_merged = (distinct_sids(merged, 8)[0] >= 0).sum(1)
    distinct_unmerged = (distinct_sids(unmerged, 8)[0] >= 0).sum(1)
    assert distinct_merged.min() >= 4 and distinct_merged.min() > distinct_unmerged.max()
    assert all(tuple(c) in existing for c in merged.codes[torch.isfinite(merged.scores)].tolist())


def test_destinations_name_the_one_code_a_fill_leaves(codes):
    lists = LongCodeCatalogue(codes, SIZES)
    rng = np.random.default_rng(5)
    beams = torch.from_numpy(codes[rng.integers(0, len(codes), 30)])
    for s in range(7):
        filled = torch.tensor([bool(s >> d & 1) for d in range(3)]).expand(len(beams), 3)
        exists, dest = lists.candidate_destinations(beams, filled)
        assert torch.equal(exists, lists.candidates_exist(beams, filled))
        for b, j, c in zip(*np.nonzero(exists.numpy())):
            pattern = beams[b].clone()
            pattern[j] = c
            known = filled[b].clone()
            known[j] = True
            matches = {g for g, code in enumerate(lists.codes.tolist())
                       if all(code[d] == pattern[d] for d in range(3) if known[d])}
            assert dest[b, j, c].item() == (matches.pop() if len(matches) == 1 else -1)


def test_top_items_expands_collisions_in_rank_order():
    codes = np.array([[0, 0, 1], [1, 1, 1], [0, 0, 1], [2, 2, 2]])
    cat = Catalogue(codes, SIZES, collision_rank=np.array([0, 0, 1, 0]))
    g = cat.groups_of(torch.tensor([[0, 0, 1], [2, 2, 2], [1, 1, 1]])).numpy()
    groups = np.array([[g[0], g[1], g[2]]])
    scores = np.array([[-1.0, -2.0, -3.0]], dtype=np.float32)
    items, item_scores = top_items(groups, scores, cat, k=3)
    assert items.tolist() == [[0, 2, 3]]  # the shared code's two items, then the next code
    assert item_scores.tolist() == [[-1.0, -1.0, -2.0]]


def test_metrics_by_hand():
    ranked = np.array([[5, 3, 9, -1], [1, 2, 3, 4], [7, 7, 7, 7]])
    truth = np.array([3, 9, 7])
    m = per_user(ranked, truth, ks=(1, 2, 4))
    assert m["recall@1"].tolist() == [0, 0, 1]
    assert m["recall@2"].tolist() == [1, 0, 1]
    np.testing.assert_allclose(m["ndcg@2"], [1 / np.log2(3), 0, 1])
    np.testing.assert_allclose(m["ndcg@4"], [1 / np.log2(3), 0, 1])
    assert selection_score({"ndcg@10": 0.5, "recall@10": 1.0}) == pytest.approx(0.6)
    assert most_frequent(np.bincount(np.array([2, 2, 1, 0, 2, 1]), minlength=4), 3).tolist() == [2, 1, 0]


def test_key_table_lookups_without_host_syncs_equal_the_shrinking_ones():
    """The GPU form of the look-up (every probe pass over every key, no boolean indexing)
    answers as the CPU form, for present keys, absent ones, and keys that collide."""
    from diffgrm_dist.decode.catalogue import KeyTable

    rng = np.random.default_rng(0)
    keys = rng.choice(1 << 40, size=5000, replace=False).astype(np.int64)
    table = KeyTable(keys, np.arange(len(keys), dtype=np.int64))
    assert table.probes > 1  # some keys needed more than one probe
    asked = torch.from_numpy(np.concatenate([keys, rng.integers(0, 1 << 40, 3000)]).reshape(-1, 8))
    shrinking = table.lookup(asked, sync_free=False)
    masked = table.lookup(asked, sync_free=True)
    assert torch.equal(shrinking, masked)
    assert torch.equal(masked.view(-1)[:5000], torch.arange(5000))


class FixedLogits(torch.nn.Module):
    """A decoder whose per-digit log-probabilities do not depend on the state: CPD by hand."""

    def __init__(self, probs):
        super().__init__()
        self.logp = torch.tensor(probs).log()  # (n, k)

    def denoise(self, memory, codes, masked):
        return self.logp.expand(codes.shape[0], -1, -1)


class HandMemory:
    mask = torch.ones(1, 1, dtype=torch.bool)


@pytest.mark.parametrize("prune, merge, expected", [
    # step: only (0,1) and (2,2) exist, so the digit-1 favourite (0) is never taken.
    ("step", True, [((0, 1), 0.15), ((2, 2), 0.04)]),
    ("step", False, [((0, 1), 0.15), ((2, 2), 0.04)]),
    # final (the paper): d1=0 (.6) and d0=0 (.5) lead; both reach (0, 0) (.30, no item's).
    # Merged, (0,0) holds one slot and (2,0) (.24) the other; unmerged, (0,0) holds both.
    ("final", True, [((0, 0), 0.30), ((2, 0), 0.24)]),
    ("final", False, [((0, 0), 0.30), ((0, 0), 0.30)]),
])
def test_cpd_pruning_and_merging_by_hand(prune, merge, expected):
    cat = Catalogue(np.array([[0, 1], [2, 2]]), (3, 3))
    model = FixedLogits([[0.5, 0.1, 0.4], [0.6, 0.3, 0.1]])
    beams = cpd(model, HandMemory(), cat, beam=2, prune=prune, merge_states=merge)
    got = [(tuple(c), round(float(s.exp()), 4)) for c, s in zip(beams.codes[0].tolist(), beams.scores[0])]
    assert got == [(c, pytest.approx(p)) for c, p in expected]
    groups = beams.groups[0].tolist()
    assert groups == [cat.groups_of(torch.tensor([c]))[0].item() for c, _ in expected]
    if prune == "final":  # no item has (0,0) or (2,0): nothing to recommend, as the paper's CPD would
        assert (beams.groups[0] < 0).all() and (distinct_sids(beams, 2)[0] < 0).all()


def reference_cpd(model, mem, codes, sizes, beam, prune, merge):
    """CPD as the paper's steps say, one beam at a time in Python: every (unfilled digit,
    code) candidate (``step``: only those some item's code agrees with), the global top
    ``beam`` per step (``merge``: one candidate per state, its best)."""
    n = len(sizes)
    items = {tuple(c) for c in codes.tolist()}
    beams = [((None,) * n, 0.0)]
    for _ in range(n):
        candidates = []
        for state, score in beams:
            filled = torch.tensor([[s is not None for s in state]])
            current = torch.tensor([[s or 0 for s in state]])
            logp = torch.log_softmax(model.denoise(mem, current, ~filled).float(), -1)[0]
            for digit in (d for d in range(n) if state[d] is None):
                for code in range(sizes[digit]):
                    new = state[:digit] + (code,) + state[digit + 1:]
                    if prune == "step" and not any(all(p is None or p == c for p, c in zip(new, item))
                                                   for item in items):
                        continue
                    candidates.append((new, score + logp[digit, code].item()))
        candidates.sort(key=lambda c: -c[1])
        if merge:
            seen, kept = set(), []
            for state, score in candidates:
                if state not in seen:
                    seen.add(state)
                    kept.append((state, score))
            candidates = kept
        beams = candidates[:beam]
    return beams


@pytest.mark.parametrize("prune", ["step", "final"])
@pytest.mark.parametrize("merge", [True, False])
def test_cpd_options_equal_the_papers_steps_run_one_beam_at_a_time(codes, prune, merge):
    model, cat = tiny_model(), Catalogue(codes, SIZES)
    memory = memory_for(model, users=2)
    beams = cpd(model, memory, cat, beam=6, prune=prune, merge_states=merge)
    for user in range(2):
        expected = reference_cpd(model, memory.select(torch.tensor([user])), codes, SIZES, 6, prune, merge)
        got = [(tuple(c), s) for c, s in zip(beams.codes[user].tolist(), beams.scores[user].tolist())
               if s > float("-inf")]  # fewer states than beams: the rest are padding
        assert [c for c, _ in got] == [c for c, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=1e-4, atol=1e-5)
        if prune == "step":
            assert (beams.groups[user][: len(got)] >= 0).all()  # every beam is an item's code
