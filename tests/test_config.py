from pathlib import Path

import pytest
from helpers.paths import CONFIGS, ROOT

from diffgrm_dist.core.config import ExperimentConfig, load_config, section_hash
from diffgrm_dist.core.errors import ConfigError


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


@pytest.mark.parametrize("override, field, value", [
    ("train.lr=3e-3", "lr", 3e-3),  # YAML 1.1 reads this as a string
    ("train.lr=1E-2", "lr", 1e-2),
    ("train.lr=3.0e-3", "lr", 3e-3),  # and this as a float
    ("train.lr=.5", "lr", 0.5),
    ("train.lr=2", "lr", 2.0),
    ("train.warmup_steps=1e4", "warmup_steps", 10_000),  # exact: an int field takes it
    ("train.warmup_steps=1.0e+4", "warmup_steps", 10_000),
    ("train.warmup_steps=10_000", "warmup_steps", 10_000),
])
def test_numeric_literals_yaml_reads_as_strings_are_numbers(override, field, value):
    cfg = load_config(CONFIGS / "beauty.yaml", [override])
    got = getattr(cfg.train, field)
    assert got == value and type(got) is type(value)


def test_numeric_literals_in_a_config_file_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: %s\ntrain:\n  lr: 3e-3\n  warmup_steps: 1e4\n" % (CONFIGS / "beauty.yaml"))
    cfg = load_config(path)
    assert cfg.train.lr == 3e-3 and cfg.train.warmup_steps == 10_000


@pytest.mark.parametrize("override, message", [
    ("train.warmup_steps=2.5e0", "must be an integer"),  # not exact
    ("train.lr=1e", "must be a number"),
    ("train.lr=true", "must be a number"),
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


def test_base_config_is_overlaid_key_by_key(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "base.yaml").write_text("name: base\ntrain:\n  lr: 0.5\n  epochs: 9\nmodel:\n  d_model: 64\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "small.yaml").write_text("base: ../base.yaml\nname: small\ntrain:\n  epochs: 2\n")
    cfg = load_config(tmp_path / "sub" / "small.yaml", ["train.lr=0.25"])
    assert cfg.name == "small" and cfg.train.epochs == 2 and cfg.model.d_model == 64
    assert cfg.train.lr == 0.25  # overrides still win
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "bad.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "bad.yaml")


def test_released_recipe_in_the_paper_configs():
    beauty, sports, toys = (load_config(CONFIGS / f"{n}.yaml") for n in ("beauty", "sports", "toys"))
    assert (beauty.train.label_smoothing, sports.train.label_smoothing, toys.train.label_smoothing) == (0.2, 0.1, 0.15)
    assert (toys.model.d_model, toys.model.heads, toys.model.ffn) == (1024, 8, 1024)
    assert (beauty.train.valid_start_epoch, toys.train.valid_start_epoch) == (20, 10)
    for cfg in (beauty, sports, toys):
        assert cfg.train.warmup_steps == 10_000 and cfg.train.epochs == 200
        assert cfg.train.loss_mean == "token" and cfg.train.select_on == "sid"
        assert cfg.prepare.min_history == 2 and cfg.train.shuffle == "windows"
        assert cfg.tokenize.opq_iters == 50 and cfg.tokenize.pca_dim == 256
    assert "{phrase}" in " ".join(beauty.data.text_template + toys.data.text_template)
    assert load_config(CONFIGS / "demo.yaml").tokenize.pca_dim == 256


@pytest.mark.parametrize("override", ["model.decoder=mlp", "train.shuffle=never", "eval.item_rule=best", "eval.cpd_prune=never",
                                      "train.select_on=loss"])
def test_choice_fields_are_checked(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_where_the_embedding_cache_lives_is_not_part_of_the_stage_hash():
    cfg = load_config(CONFIGS / "tiny.yaml")
    before = section_hash(cfg.tokenize)
    cfg.tokenize.embedding_cache = "/elsewhere"
    assert section_hash(cfg.tokenize) == before
    cfg.tokenize.pca_dim += 4
    assert section_hash(cfg.tokenize) != before


def test_options_added_later_count_in_the_hash_only_when_set():
    """``if_set`` fields keep finished runs current at their default; block size never counts."""
    import dataclasses
    import hashlib
    import json

    from diffgrm_dist.core.config import _hashed

    cfg = load_config(CONFIGS / "tiny.yaml")
    fields = _hashed(cfg.tokenize)
    assert "embeddings" not in fields and "fit_items" not in fields and "block_items" not in fields
    before = section_hash(cfg.tokenize)
    assert before == hashlib.sha256(json.dumps([fields], sort_keys=True, default=str).encode()).hexdigest()[:16]
    cfg.tokenize.block_items = 7
    assert section_hash(cfg.tokenize) == before
    for change in ({"fit_items": 100}, {"embeddings": "emb.parquet"}):
        assert section_hash(dataclasses.replace(cfg.tokenize, **change)) != before
