"""Model shapes and masks, OCN view construction by hand, loss means by hand."""

import math

import pytest
import torch

from diffgrm_dist.core.config import ModelConfig
from diffgrm_dist.model.network import DiffGRM, SidSpec
from diffgrm_dist.model.objectives import DiffusionObjective, confidence, masked_cross_entropy, nested_views, rank_of

SPEC = SidSpec((16, 16, 16, 16), max_history=10)


def model(dropout=0.0, **kw) -> DiffGRM:
    torch.manual_seed(0)
    return DiffGRM(ModelConfig(d_model=32, heads=4, ffn=64, encoder_layers=1, decoder_layers=2,
                               dropout=dropout, **kw), SPEC).eval()


def batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, 16, (b, 10, 4), generator=g)
    mask = torch.zeros(b, 10, dtype=torch.bool)
    for i in range(b):
        mask[i, 10 - (i + 1):] = True  # left padding, i+1 real items
    targets = torch.randint(0, 16, (b, 4), generator=g)
    return history, mask, targets


def test_reference_size_has_5_6m_parameters():
    m = DiffGRM(ModelConfig(), SidSpec((256,) * 4, 50))
    assert 4.5e6 < m.num_parameters() < 6.5e6  # released model: 5.6M


def test_shapes():
    m = model()
    history, mask, targets = batch()
    memory = m.encode(history, mask)
    assert len(memory.kv) == 2 and memory.kv[0][0].shape == (6, 4, 10, 8)
    logits = m.denoise(memory, targets, torch.ones_like(targets, dtype=torch.bool))
    assert logits.shape == (6, 4, 16)
    grouped = m.denoise(memory, targets.repeat_interleave(3, 0), torch.rand(18, 4) < 0.5)
    assert grouped.shape == (18, 4, 16)
    assert m.autoregress(memory, targets[:, :2]).shape == (6, 3, 16)


def test_masked_digit_never_sees_its_own_code():
    m = model()
    history, mask, targets = batch()
    memory = m.encode(history, mask)
    masked = torch.tensor([[True, False, True, False]]).expand(6, 4)
    base = m.denoise(memory, targets, masked)
    for digit in (0, 2):  # changing a masked digit's true code changes nothing at all
        changed = targets.clone()
        changed[:, digit] = (changed[:, digit] + 5) % 16
        assert torch.equal(m.denoise(memory, changed, masked), base)
    changed = targets.clone()
    changed[:, 1] = (changed[:, 1] + 5) % 16  # a shown digit does inform the others
    assert not torch.allclose(m.denoise(memory, changed, masked)[:, 0], base[:, 0])


def test_autoregressive_decoder_is_causal():
    m = model()
    history, mask, targets = batch()
    memory = m.encode(history, mask)
    base = m.autoregress(memory, targets[:, :3])
    changed = targets.clone()
    changed[:, 2] = (changed[:, 2] + 3) % 16
    out = m.autoregress(memory, changed[:, :3])
    assert torch.equal(out[:, :3], base[:, :3])  # digits 0..2 do not see digit 2's code
    assert not torch.allclose(out[:, 3], base[:, 3])


def test_padding_is_ignored():
    m = model()
    history, mask, targets = batch()
    noisy = torch.where(mask[..., None], history, torch.randint(0, 16, history.shape))
    a, b = m.encode(history, mask), m.encode(noisy, mask)
    all_masked = torch.ones_like(targets, dtype=torch.bool)
    assert torch.allclose(m.denoise(a, targets, all_masked), m.denoise(b, targets, all_masked), atol=1e-6)


def test_grouped_cross_attention_equals_per_row_memory():
    """Beams/views sharing a memory row give the same logits as copying that row."""
    m = model()
    history, mask, targets = batch(b=3)
    memory = m.encode(history, mask)
    codes = targets.repeat_interleave(2, 0)
    masked = torch.rand(6, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    grouped = m.denoise(memory, codes, masked)
    copied = m.denoise(m.encode(history.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)),
                       codes, masked)
    assert torch.allclose(grouped, copied, atol=1e-5)


def test_ocn_views_by_hand():
    # Confidence of digits 0..3: 0.9, 0.1, 0.5, 0.3 -> least confident first: 1, 3, 2, 0.
    probs = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    logits = torch.stack([torch.log(torch.tensor([p, 1 - p])) for p in probs[0]])[None]
    conf = confidence(logits, "max_prob")
    assert torch.allclose(conf, torch.tensor([[0.9, 0.9, 0.5, 0.7]]))  # max(p, 1-p)
    raw = probs  # rank by the raw numbers above, as the probe's confidence would
    order = torch.argsort(raw, dim=1)
    views = nested_views(rank_of(order))[:, 0]
    expected = torch.tensor([[False, True, False, False],
                             [False, True, False, True],
                             [False, True, True, True],
                             [True, True, True, True]])
    assert torch.equal(views, expected)
    most = nested_views(rank_of(torch.argsort(raw, dim=1, descending=True)))[:, 0]
    assert torch.equal(most[0], torch.tensor([True, False, False, False]))


def test_negative_entropy_confidence():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [1.0, 1e-12]]]))
    conf = confidence(logits, "neg_entropy")
    assert conf[0, 0].item() == pytest.approx(-math.log(2), abs=1e-6)
    assert conf[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_loss_means_by_hand():
    # 2 views, 1 example, 2 digits, 2 codes; uniform logits -> CE = ln 2 everywhere, except
    # view 1 digit 1 which is confidently right (CE ~ 0).
    logits = torch.zeros(2, 1, 2, 2)
    logits[1, 0, 1] = torch.tensor([0.0, 50.0])
    targets = torch.tensor([[0, 1]])
    masks = torch.tensor([[[True, False]], [[True, True]]])
    ln2 = math.log(2)
    view = masked_cross_entropy(logits, targets, masks, 0.0, "view", (2, 2))
    token = masked_cross_entropy(logits, targets, masks, 0.0, "token", (2, 2))
    assert view.item() == pytest.approx((ln2 + (ln2 + 0) / 2) / 2, abs=1e-5)
    assert token.item() == pytest.approx((ln2 + ln2 + 0) / 3, abs=1e-5)


@pytest.mark.parametrize("objective", ["ocn", "random", "random_order", "most_confident", "refresh"])
def test_every_objective_builds_valid_views_and_a_finite_loss(objective):
    m = model()
    obj = DiffusionObjective(m, objective, "max_prob", 0.1, "view").train()
    history, mask, targets = batch()
    views = obj.views(m.encode(history, mask), targets)
    assert views.shape == (4, 6, 4) and views.any(-1).all()
    if objective != "random":  # nested: each view masks one more digit
        assert torch.equal(views.sum(-1), torch.arange(1, 5)[:, None].expand(4, 6))
        assert (views[1:] >= views[:-1]).all()
    loss = obj(history, mask, targets)
    loss.backward()
    assert torch.isfinite(loss) and m.codes.weight.grad.abs().sum() > 0


def test_ocn_probe_runs_without_dropout_and_without_grad():
    m = model(dropout=0.5)
    obj = DiffusionObjective(m, "ocn", "max_prob", 0.0, "view").train()
    history, mask, targets = batch()
    memory = m.encode(history, mask)
    all_masked = torch.ones_like(targets, dtype=torch.bool)
    a = obj.probe(memory, targets, all_masked)
    b = obj.probe(memory, targets, all_masked)
    assert torch.equal(a, b) and not a.requires_grad  # deterministic: dropout off
    assert m.training  # and training mode restored afterwards


def test_padding_width_does_not_change_the_encoding():
    """Positions count back from the most recent slot, so a batch padded only to its own
    longest history encodes exactly as one padded to max_history."""
    m = model()
    history, mask, _ = batch()
    full = m.encode(history, mask)
    width = int(mask.sum(1).max())  # 6 of 10 slots
    narrow = m.encode(history[:, -width:], mask[:, -width:])
    torch.testing.assert_close(narrow.last, full.last, rtol=1e-5, atol=1e-6)
    targets = torch.zeros(6, 4, dtype=torch.long)
    masked = torch.ones(6, 4, dtype=torch.bool)
    torch.testing.assert_close(m.denoise(narrow, targets, masked), m.denoise(full, targets, masked),
                               rtol=1e-5, atol=1e-6)


def test_dense_head_scores_every_item_and_learns():
    from diffgrm_dist.model.objectives import DenseObjective

    torch.manual_seed(0)
    m = DiffGRM(ModelConfig(d_model=32, heads=4, ffn=64, decoder="dense", dropout=0.0),
                SidSpec((16,) * 4, 10, items=50))
    assert len(m.decoder) == 0 and m.item_emb.weight.shape == (50, 32)
    history, mask, targets = batch()
    items = torch.arange(6) * 7
    assert m.item_logits(m.encode(history, mask)).shape == (6, 50)
    objective = DenseObjective(m, label_smoothing=0.0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(30):  # a handful of examples are memorised by a working loop
        loss = objective(history, mask, targets, items)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(50), rel=0.05) and loss.item() < 0.2 * first
    with pytest.raises(ValueError, match="catalogue size"):
        DiffGRM(ModelConfig(decoder="dense"), SidSpec((16,) * 4, 10))


def test_without_digit_positions_the_decoder_has_none_and_still_knows_each_digit():
    """model.digit_pos=false (the released decoder): no position table; a slot's digit comes
    from its mask embedding or its code's row, so fully masked slots still differ by digit,
    and the AR KV-cache step still equals the teacher-forced decoder."""
    from diffgrm_dist.core.config import section_hash

    with_pos, without = model(), model(digit_pos=False)
    assert "digit_pos" in with_pos.state_dict() and "digit_pos" not in without.state_dict()
    assert with_pos.num_parameters() - without.num_parameters() == 4 * 32
    assert section_hash(ModelConfig()) == section_hash(ModelConfig(digit_pos=True))  # old runs stay current
    assert section_hash(ModelConfig(digit_pos=False)) != section_hash(ModelConfig())
    history, mask, targets = batch()
    memory = without.encode(history, mask)
    logits = without.denoise(memory, targets, torch.ones_like(targets, dtype=torch.bool))
    assert not torch.allclose(logits[:, 0], logits[:, 1])  # per-digit mask embeddings
    ar = DiffGRM(ModelConfig(d_model=32, heads=4, ffn=64, decoder_layers=2, dropout=0.0, digit_pos=False,
                             decoder="autoregressive"), SPEC).eval()
    memory = ar.encode(history, mask)
    forced = ar.autoregress(memory, targets[:, :3])
    past, prev = None, None
    for step in range(4):
        step_logits, past = ar.autoregress_step(memory, prev, step, past)
        torch.testing.assert_close(step_logits, forced[:, step], rtol=1e-4, atol=1e-5)
        prev = targets[:, step]
