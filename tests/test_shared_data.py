"""prepare on the paper's three datasets (skipped when ../shared/data is absent)."""

import json

import pytest
from helpers.paths import CONFIGS, require_amazon

from diffgrm_dist.core.config import load_config

EXPECTED = {  # users, items, interactions: the paper's table
    "beauty": (22_363, 12_101, 198_502),
    "sports": (35_598, 18_357, 296_337),
    "toys": (19_412, 11_924, 167_597),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("name", list(EXPECTED))
def test_prepare_amazon2014(name, tmp_path, run_cli):
    require_amazon(name)
    code, out, err = run_cli("prepare", "-c", CONFIGS / f"{name}.yaml", "-o", tmp_path)
    assert code == 0, err
    stats = json.loads((tmp_path / "prepare" / "stats.json").read_text())
    users, items, interactions = EXPECTED[name]
    assert (stats["users"], stats["items"], stats["interactions"]) == EXPECTED[name]
    # Every user has >= 5 interactions, so each gives n - 2 - min_history windows
    # (the last two are validation and test targets).
    min_history = load_config(CONFIGS / f"{name}.yaml").prepare.min_history
    assert stats["train_samples"] == interactions - (2 + min_history) * users
    assert stats["valid_users"] == stats["test_users"] == users
    assert sum(stats["dropped"].values()) == 0
