from pathlib import Path

import pytest

from conftest import CONFIGS, ROOT
from diffgrm_dist.config import ExperimentConfig, load_config, section_hash
from diffgrm_dist.errors import ConfigError


@pytest.mark.parametrize("name", ["demo", "beauty", "sports", "toys", "tiny"])
def test_every_config_loads(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name


@pytest.mark.parametrize("name", ["beauty", "sports", "toys"])
def test_amazon_configs_point_at_shared_data_relative_to_project_root(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert Path(cfg.data.path) == (ROOT / "../shared/data/amazon2014" / name).resolve()


def test_paper_settings():
    beauty, sports, toys = (load_config(CONFIGS / f"{n}.yaml") for n in ("beauty", "sports", "toys"))
    assert (beauty.train.lr, sports.train.lr, toys.train.lr) == (1e-2, 3e-3, 3e-3)
    assert (beauty.eval.beam_size, sports.eval.beam_size, toys.eval.beam_size) == (256, 128, 128)
    assert (beauty.model.d_model, toys.model.d_model) == (256, 1024)
    assert beauty.model.decoder_layers == 4 and beauty.model.encoder_layers == 1


def test_overrides_are_typed(tmp_path):
    cfg = load_config(CONFIGS / "beauty.yaml",
                      ["train.lr=0.5", "train.epochs=3", "train.bf16=true",
                       'data.text_template=["{phrase}"]', "name=007"])
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 3 and cfg.train.bf16 is True
    assert cfg.data.text_template == ["{phrase}"]
    assert cfg.name == "007"


def test_data_path_override_is_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIGS / "beauty.yaml", ["data.path=elsewhere/beauty"])
    assert Path(cfg.data.path) == tmp_path / "elsewhere" / "beauty"
    cfg = load_config(CONFIGS / "beauty.yaml", ["data.path=/abs/beauty"])
    assert cfg.data.path == "/abs/beauty"


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", "unknown key 'nope'"),
    ("nosection.x=1", "unknown key 'nosection'"),
    ("train.epochs=three", "must be an integer"),
    ("train.bf16=3", "must be true/false"),
    ("train.lr", "expected key.sub=value"),
    ("data.format=csv", "data.format"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "beauty.yaml", [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  format: synthetic\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'data\.colour'"):
        load_config(path)


def test_section_hash_changes_with_values():
    a, b = ExperimentConfig(), ExperimentConfig()
    assert section_hash(a.data) == section_hash(b.data)
    b.data.min_user_items = 4
    assert section_hash(a.data) != section_hash(b.data)
