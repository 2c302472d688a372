"""Item ranking across colliding codes, and label smoothing over the codes that exist."""

import numpy as np
import pytest
import torch

from diffgrm_dist.core.config import ModelConfig
from diffgrm_dist.decode.catalogue import Catalogue
from diffgrm_dist.decode.search import Beams, rank_items
from diffgrm_dist.model.network import DiffGRM, SidSpec
from diffgrm_dist.model.objectives import DiffusionObjective, masked_cross_entropy

SIZES = (4, 4, 4)
# Code A = (0,0,1) names items 0, 2, 4 (training counts 10, 3, 0); code B = (1,1,1) names
# items 1, 5, 6 (no counts: uniform); code C = (2,2,2) names item 3 alone.
CODES = np.array([[0, 0, 1], [1, 1, 1], [0, 0, 1], [2, 2, 2], [0, 0, 1], [1, 1, 1], [1, 1, 1]])
COUNTS = np.array([10, 0, 3, 0, 0, 0, 0])
RANK = np.array([0, 0, 1, 0, 2, 1, 2])  # popularity order within each code


@pytest.fixture
def catalogue():
    return Catalogue(CODES, SIZES, RANK, COUNTS)


def beams(cat, code_scores):
    """Finished beams for one user: the codes in the given order with these scores."""
    codes = torch.tensor([c for c, _ in code_scores])[None]
    return Beams(codes, torch.tensor([[s for _, s in code_scores]]), cat.groups_of(codes))


def test_item_prior_is_smoothed_training_frequency_within_the_code(catalogue):
    logp = dict(zip(catalogue.item_list.tolist(), catalogue.item_logp.tolist()))
    # A: (count + 1) / (13 + 3 items); B: (0 + 1) / (0 + 3); C alone: 1.
    assert logp[0] == pytest.approx(np.log(11 / 16)) and logp[2] == pytest.approx(np.log(4 / 16))
    assert logp[4] == pytest.approx(np.log(1 / 16))
    assert [logp[i] for i in (1, 5, 6)] == pytest.approx([np.log(1 / 3)] * 3)
    assert logp[3] == 0.0


def test_code_prob_ranks_items_across_codes(catalogue):
    b = beams(catalogue, [((0, 0, 1), -1.0), ((1, 1, 1), -1.2), ((2, 2, 2), -1.9)])
    ranked = rank_items(b, catalogue, k=2, rule="code_prob")
    # Item 3, alone in the third code, beats the tails of the two better codes, so a code
    # beyond the first k is reached, and it keeps its code's score exactly.
    assert ranked.items.tolist() == [[0, 3]]
    assert ranked.scores[0].tolist() == pytest.approx([-1.0 + np.log(11 / 16), -1.9])
    full = rank_items(b, catalogue, k=7, rule="code_prob")
    # A's tail (items 2, 4) ranks below B's best item only where the scores say so:
    # 1/5/6 at -1.2 + log(1/3) = -2.30 sit above item 2 at -1.0 + log(4/16) = -2.39.
    assert full.items.tolist() == [[0, 3, 1, 5, 6, 2, 4]]
    assert (np.diff(full.scores[0]) <= 0).all()
    assert ranked.groups.tolist() == rank_items(b, catalogue, k=2, rule="expand").groups.tolist()


def test_crowded_code_tail_ranks_below_the_next_codes_best_item(catalogue):
    b = beams(catalogue, [((0, 0, 1), -1.0), ((2, 2, 2), -1.5)])
    assert rank_items(b, catalogue, k=4, rule="code_prob").items.tolist() == [[0, 3, 2, 4]]
    # expand: the first code's items fill the list with the code's score, in rank order.
    expand = rank_items(b, catalogue, k=4, rule="expand")
    assert expand.items.tolist() == [[0, 2, 4, 3]]
    assert expand.scores.tolist() == [[-1.0, -1.0, -1.0, -1.5]]


def test_an_item_alone_in_its_code_keeps_the_code_score():
    codes = np.array([[0, 0, 0], [1, 2, 3], [3, 3, 3]])
    cat = Catalogue(codes, SIZES, np.zeros(3, np.int64), np.array([5, 0, 7]))
    b = beams(cat, [((1, 2, 3), -0.5), ((3, 3, 3), -0.7), ((0, 0, 0), -2.0)])
    for rule in ("code_prob", "expand"):
        ranked = rank_items(b, cat, k=3, rule=rule)
        assert ranked.items.tolist() == [[1, 2, 0]]
        assert ranked.scores[0].tolist() == pytest.approx([-0.5, -0.7, -2.0])


def test_unreached_and_duplicate_beams_are_ignored(catalogue):
    # The same code twice (two fill orders) counts once with its best score; -inf beams
    # (no state) contribute nothing.
    b = beams(catalogue, [((2, 2, 2), -0.3), ((2, 2, 2), -0.9), ((0, 0, 1), float("-inf"))])
    b.groups[0, 2] = -1
    ranked = rank_items(b, catalogue, k=3, rule="code_prob")
    assert ranked.items.tolist() == [[3, -1, -1]]


# --------------------------------------------------------------------------- smoothing


def test_label_smoothing_spreads_mass_over_existing_codes_only():
    """The extra digit has 3 codes, the others 8: logits of codes 3..7 of digit 2 are -inf
    (no such code). The loss must be finite and bounded, match the smoothed CE over the 3
    real codes, and send no gradient to the codes that do not exist."""
    torch.manual_seed(0)
    sizes = (8, 8, 3)
    logits = torch.randn(2, 5, 3, 8)
    logits[..., 2, 3:] = float("-inf")
    logits.requires_grad_(True)
    targets = torch.stack([torch.randint(0, s, (5,)) for s in sizes], dim=1)
    masks = torch.ones(2, 5, 3, dtype=torch.bool)
    loss = masked_cross_entropy(logits, targets, masks, 0.2, "token", sizes)
    loss.backward()
    assert torch.isfinite(loss) and 0 < loss.item() < np.log(8) + 3
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[..., 2, 3:] == 0).all()
    # By hand for digit 2: 0.8 * nll + 0.2 * mean over the 3 real codes of -log p.
    logp = torch.log_softmax(logits.detach()[..., 2, :3], -1)
    nll = -logp.gather(-1, targets[:, 2].expand(2, 5)[..., None])[..., 0]
    manual = 0.8 * nll + 0.2 * (-logp.mean(-1))
    rest = [masked_cross_entropy(logits.detach()[..., d:d + 1, :sizes[d]], targets[:, d:d + 1],
                                 masks[..., :1], 0.2, "token", (sizes[d],)) for d in (0, 1)]
    expected = (manual.sum() + 10 * sum(rest)) / 30
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_extra_digit_model_loss_settles_to_a_normal_value():
    """Before the fix the -1e9 fill turned label smoothing into a ~1e8 loss."""
    torch.manual_seed(0)
    model = DiffGRM(ModelConfig(d_model=32, heads=2, ffn=64, decoder_layers=1, dropout=0.0),
                    SidSpec((8, 8, 3), 6))
    objective = DiffusionObjective(model, "ocn", "max_prob", 0.2, "token")
    history = torch.randint(0, 3, (16, 6, 3))
    targets = torch.stack([torch.randint(0, s, (16,)) for s in (8, 8, 3)], dim=1)
    loss = objective(history, torch.ones(16, 6, dtype=torch.bool), targets)
    loss.backward()
    assert 0 < loss.item() < 2 * np.log(8)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
