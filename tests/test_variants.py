"""The variant runner (``diffgrm_dist.variants``) behind make demo's second table,
tools/run_variants.py and tools/reproduce.py: variants adopt what another run of their home
holds for the same config, and an evaluation-only variant never silently retrains."""

import shutil

import pytest
from helpers.paths import CONFIGS

from diffgrm_dist.core.errors import ConfigError
from diffgrm_dist.variants import Variant, parse_variant, run_variant

TINY = CONFIGS / "tiny.yaml"


def test_parse_variant_reads_the_cli_form():
    assert parse_variant("fast=eval.beam_size=7 train.epochs=1") == \
        Variant("fast", ("eval.beam_size=7", "train.epochs=1"))
    assert parse_variant("as_is=") == Variant("as_is")
    with pytest.raises(ConfigError, match="expected NAME=key=value"):
        parse_variant("no-equals-sign")


def test_an_evaluation_only_variant_without_its_model_is_an_error_not_a_retraining(tiny_run, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(tiny_run, home / "base")  # prepare, tokenize and shard, but no trained model
    with pytest.raises(ConfigError, match=r"re-evaluates the model of base.*holds no trained model"):
        run_variant(TINY, Variant("beam7", ("eval.beam_size=7",), model_of="base"), home)
    assert not (home / "beam7.log").exists()  # nothing ran


@pytest.mark.slow
def test_variants_share_stages_and_a_test_time_variant_reuses_the_model(tiny_run, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(tiny_run, tmp_path / "seed")
    base = run_variant(TINY, Variant("base"), home, extra_donors=[tmp_path / "seed"])
    assert base.adopted == ["prepare", "tokenize", "shard"]  # from the seed run; train and evaluate ran
    beam = run_variant(TINY, Variant("beam7", ("eval.beam_size=7",), model_of="base"), home)
    assert beam.adopted == ["prepare", "tokenize", "shard", "train"]
    weights = "train/model.safetensors"
    assert (home / "beam7" / weights).read_bytes() == (home / "base" / weights).read_bytes()
    assert beam.metrics["beam"] == 7 and base.metrics["beam"] != 7
    assert beam.summary()["overrides"] == ["eval.beam_size=7"] and (home / "beam7.log").stat().st_size > 0
    again = run_variant(TINY, Variant("base"), home)  # everything current: nothing re-runs
    assert again.adopted == ["prepare", "tokenize", "shard", "train", "evaluate"]
    assert again.metrics == base.metrics
