"""The reproduction's parts that run in seconds: its configs and variants, stage adoption
across runs, and the table built from result files (the runs themselves never run in CI)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics

import numpy as np
import pytest
import reproduce
from helpers.paths import CONFIGS, require_amazon

from diffgrm_dist.core.config import load_config, section_hash
from diffgrm_dist.core.rundir import RunDir
from diffgrm_dist.stages import STAGES, adopt_current_stages, stage_record

SCALE_KEYS = {"model": ("d_model", "heads", "ffn", "decoder_layers"),
              "train": ("lr", "warmup_steps", "batch_size", "epochs", "patience", "valid_start_epoch", "bucket_batches",
                        "autocast_bf16", "loader_workers"),
              "eval": ("valid_users", "valid_beam_size", "beam_size", "batch_size")}


@pytest.mark.parametrize("dataset", reproduce.DATASETS)
def test_cpu_configs_are_the_paper_configs_with_only_the_scale_changed(dataset):
    paper, cpu = load_config(CONFIGS / f"{dataset}.yaml"), load_config(reproduce.config_path(dataset))
    for section in ("data", "prepare", "tokenize", "shard"):
        assert section_hash(getattr(paper, section)) == section_hash(getattr(cpu, section)), section
    for section in ("model", "train", "eval"):
        a, b = getattr(paper, section), getattr(cpu, section)
        differ = {k for k in vars(a) if getattr(a, k) != getattr(b, k)}
        assert differ <= set(SCALE_KEYS[section]), (section, differ - set(SCALE_KEYS[section]))
    assert cpu.train.label_smoothing == paper.train.label_smoothing and cpu.model.d_model == 128


def test_every_variant_is_a_valid_config_on_its_datasets():
    for variant in reproduce.VARIANTS:
        for dataset in variant.datasets:
            cfg = load_config(reproduce.config_path(dataset), list(variant.overrides))
            assert cfg.name == f"{dataset}-cpu"
    names = [v.name for v in reproduce.VARIANTS]
    assert len(set(names)) == len(names) and set(reproduce.SEEDS) <= set(names)
    paired = {v.paired_with for v in reproduce.VARIANTS if v.paired_with}
    assert paired <= set(names)


def test_evaluation_only_variants_change_only_what_training_never_reads():
    """A paired variant reuses its partner's trained model, so it may change only test-time
    eval fields: the train stage's view of the config must be the partner's."""
    from diffgrm_dist.core.config import EvalConfig, validation_view

    test_only = {f.name for f in dataclasses.fields(EvalConfig) if f.metadata.get("test_only")}
    for variant in (v for v in reproduce.VARIANTS if v.paired_with):
        changed = reproduce.eval_only_overrides(variant)
        assert changed and all(o.startswith("eval.") and o.split("=")[0][5:] in test_only for o in changed)
        partner = next(v for v in reproduce.VARIANTS if v.name == variant.paired_with)
        for dataset in variant.datasets:
            mine = load_config(reproduce.config_path(dataset), list(variant.overrides))
            theirs = load_config(reproduce.config_path(dataset), list(partner.overrides))
            assert (mine.model, mine.train, validation_view(mine.eval)) == \
                (theirs.model, theirs.train, validation_view(theirs.eval))
            assert mine.eval != theirs.eval


def test_test_time_eval_settings_do_not_retrain(tiny_run):
    """The train stage's hash covers what validation reads, not the test beam or the
    test-time decoding options; those re-run evaluate only."""
    run = RunDir(tiny_run)
    base = load_config(CONFIGS / "tiny.yaml")
    for override in ("eval.beam_size=7", "eval.fill_order=random", "eval.fill_digits=2", "eval.split=valid",
                     "eval.cpd_prune=final", "eval.merge_states=false"):
        changed = load_config(CONFIGS / "tiny.yaml", [override])
        assert stage_record(STAGES["train"], changed, run) == stage_record(STAGES["train"], base, run), override
        assert section_hash(changed.eval) != section_hash(base.eval), override  # evaluate re-runs
    validation = load_config(CONFIGS / "tiny.yaml", ["eval.valid_beam_size=3"])
    assert stage_record(STAGES["train"], validation, run) != stage_record(STAGES["train"], base, run)


def test_a_run_adopts_the_stages_another_run_holds_for_the_same_config(tiny_run, tmp_path):
    donor = tmp_path / "donor"
    shutil.copytree(tiny_run, donor)
    cfg = load_config(CONFIGS / "tiny.yaml")
    same = RunDir(tmp_path / "same")
    assert adopt_current_stages(cfg, same, [RunDir(donor)]) == ["prepare", "tokenize", "shard"]
    for name in ("prepare", "tokenize", "shard"):  # adopted stages are current: the pipeline skips them
        assert same.is_current(stage_record(STAGES[name], cfg, same))
    assert not (same.root / "train").exists()

    # Other shards: prepare and tokenize still shared, the shards (and all after) run afresh.
    other = load_config(CONFIGS / "tiny.yaml", ["shard.samples_per_shard=7"])
    partial = RunDir(tmp_path / "partial")
    assert adopt_current_stages(other, partial, [RunDir(donor)]) == ["prepare", "tokenize"]
    assert not (partial.root / "shard").exists()

    # Another SID length: nothing after prepare matches.
    digits = load_config(CONFIGS / "tiny.yaml", ["tokenize.kmeans_iters=3"])
    assert adopt_current_stages(digits, RunDir(tmp_path / "none"), [RunDir(donor)]) == ["prepare"]


def _result(dataset: str, variant: str, item_n10: float, pop_n10: float = 0.01, distinct: int = 100,
            commit: str = "abcdef0123") -> dict:
    block = {"recall@5": item_n10, "ndcg@5": item_n10 / 2, "recall@10": 2 * item_n10, "ndcg@10": item_n10}
    return {"dataset": dataset, "variant": variant, "commit": commit, "machine": "cpu: test",
            "metrics": {"decoder": "dense" if variant == "dense" else "diffusion", "item": block,
                        "sid": {k: 1.5 * v for k, v in block.items()},
                        "popularity": {k: pop_n10 for k in block}},
            "train": {"wall_s": 600.0, "parameters": 1000},
            "tokenize": {"distinct_codes": distinct, "colliding_items": 5, "max_items_per_code": 3}}


def test_the_table_reads_every_result_file_and_summarises_the_seeds(tmp_path):
    values = {"diffgrm": 0.030, "diffgrm_seed1": 0.034, "diffgrm_seed2": 0.032, "dense": 0.05}
    for variant, n10 in values.items():
        path = reproduce.result_path("beauty", variant, tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_result("beauty", variant, n10)))
    found = reproduce.load_results(tmp_path)
    assert set(found["beauty"]) == set(values)
    readme = reproduce.write_table(found, tmp_path).read_text()
    assert (tmp_path / "cpu" / "ndcg10.png").stat().st_size > 1000
    rows = {line.split(" | ")[0].lstrip("| "): line for line in readme.splitlines() if line.startswith("| ")}
    assert "| 3.00x |" in rows["DiffGRM: PSE (OPQ) SIDs + OCN + CPD [at abcdef0, not in this clone]"]  # 0.030 / popularity 0.010
    seeds = [values[s] for s in reproduce.SEEDS]
    sd = statistics.stdev(seeds)
    assert f"{statistics.mean(seeds):.4f} ± {sd:.4f}" in rows["DiffGRM, 3 training seeds: mean ± sd"]
    # abcdef0 is no commit of this clone: the row says so; its difference uses the seeds' sd.
    dense = rows["dense next-item baseline (SASRec-style item softmax) [at abcdef0, not in this clone]"]
    assert f"| +0.0200 ± {1.96 * 2 ** 0.5 * sd:.4f} |" in dense
    assert "0.0502" in rows["*paper: DiffGRM (SID level, paper scale)*"]
    missing = next(line for line in readme.splitlines() if line.startswith("Not run yet:"))
    listed = set(missing.removeprefix("Not run yet: ").split(" (")[0].split(", "))
    assert listed == {v.name for v in reproduce.VARIANTS if "beauty" in v.datasets} - set(values)
    assert "### Sports" not in readme  # no result files: no table


def _write(root, result):
    path = reproduce.result_path(result["dataset"], result["variant"], root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))


def test_differences_are_read_against_the_larger_of_the_two_spreads(tmp_path):
    """Training seeds share one set of SIDs (a re-run main row on other SIDs is replaced by
    its superseded version from history); tokenization seeds are the current rows; the
    interval uses the larger spread."""
    old_main = _result("beauty", "diffgrm", 0.020, distinct=100)
    reproduce.write_json(reproduce.history_path("beauty", "diffgrm", "1234567", tmp_path), old_main)
    for variant, n10, distinct in (("diffgrm", 0.030, 90), ("diffgrm_seed1", 0.021, 100),
                                   ("diffgrm_seed2", 0.022, 100), ("diffgrm_tok1", 0.024, 91),
                                   ("diffgrm_tok2", 0.036, 92), ("ar", 0.025, 90)):
        _write(tmp_path, _result("beauty", variant, n10, distinct=distinct))
    results = reproduce.load_results(tmp_path)["beauty"]
    groups = reproduce.seed_groups(results, reproduce.load_history(tmp_path)["beauty"])
    assert [r["metrics"]["item"]["ndcg@10"] for r in groups["training seeds"]] == [0.020, 0.021, 0.022]
    assert [r["metrics"]["item"]["ndcg@10"] for r in groups["tokenization seeds"]] == [0.030, 0.024, 0.036]
    sd, spreads = reproduce.run_to_run_sd(groups, lambda r: r["metrics"]["item"]["ndcg@10"])
    assert spreads == pytest.approx({"training seeds": 0.001, "tokenization seeds": 0.006})
    assert sd == pytest.approx(0.006)

    check = reproduce.compare(results["diffgrm"], _result("beauty", "diffgrm", 0.026, distinct=95), groups)
    n10 = check["metrics"]["item N@10"]
    assert n10["diff"] == pytest.approx(-0.004)
    assert n10["interval"] == pytest.approx([-0.004 - 1.96 * 2 ** 0.5 * 0.006, -0.004 + 1.96 * 2 ** 0.5 * 0.006])
    assert check["sids"] == {"committed": (90, 5, 3), "head": (95, 5, 3)}
    text = "\n".join(reproduce.format_check("beauty/diffgrm", check))
    assert "diff -0.0040" in text and "0 inside" in text and "tokenization seeds 0.0060" in text
    assert "machines differ" not in text
    other = reproduce.compare(results["diffgrm"], {**_result("beauty", "diffgrm", 0.026), "machine": "cpu: other"},
                              groups)
    assert "machines differ: committed on cpu: test; HEAD on cpu: other" in "\n".join(
        reproduce.format_check("beauty/diffgrm", other))

    # A dataset without seed runs borrows the largest relative spread (Beauty's tokenization
    # seeds: 0.006 / 0.030 = 0.2), scaled to its committed row, as its table does.
    found, history = reproduce.load_results(tmp_path), reproduce.load_history(tmp_path)
    toys = reproduce.compare(_result("toys", "diffgrm", 0.025), _result("toys", "diffgrm", 0.020), {}, found, history)
    assert toys["metrics"]["item N@10"]["sd"] == pytest.approx(0.2 * 0.025)
    assert "0 inside" in "\n".join(reproduce.format_check("toys/diffgrm", toys))  # -0.005 within ± 0.0139


def test_a_check_counts_the_committed_row_among_the_training_seeds_it_shares_sids_with():
    """--check on the main row: HEAD's run (other SIDs) replaces it, but the committed run
    still measures the training-seed spread with seeds 1 and 2 (it was missing from the
    check's groups, so the spread came from two runs, not three)."""
    committed = _result("beauty", "diffgrm", 0.020, distinct=100)
    results = {name: _result("beauty", name, n10, distinct=100)
               for name, n10 in (("diffgrm_seed1", 0.021), ("diffgrm_seed2", 0.025))}
    fresh = _result("beauty", "diffgrm", 0.030, distinct=90)
    groups = reproduce.check_groups({**results, "diffgrm": committed}, {}, "diffgrm", committed, fresh)
    assert [r["metrics"]["item"]["ndcg@10"] for r in groups["training seeds"]] == [0.020, 0.021, 0.025]
    assert "tokenization seeds" not in groups  # HEAD's run alone is no spread


def test_back_filled_machine_notes_name_the_same_machine():
    note = "cpu: X, 2 cores (this machine type; recorded when the result was filed under results/cpu)"
    assert reproduce.machine_of({"machine": note}) == reproduce.machine_of({"machine": "cpu: X, 2 cores"})
    assert reproduce.machine_of({}) == "unknown"


def test_rows_made_before_a_quality_bearing_change_are_marked_with_their_commit(tmp_path):
    """A throwaway git repository: a row is current until a later commit touches
    QUALITY_CODE; a change elsewhere leaves it current."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "diffgrm_dist").mkdir()
    (tmp_path / "diffgrm_dist" / "model.py").write_text("a = 1\n")
    git("add", "-A")
    git("commit", "-qm", "model")
    row = {"commit": git("rev-parse", "HEAD"), "package_dirty": False}
    assert reproduce.stale_mark(row, tmp_path) == ""
    assert reproduce.stale_mark({**row, "package_dirty": True}, tmp_path) == f" [at {row['commit'][:7]}*]"
    (tmp_path / "notes.md").write_text("docs\n")
    git("add", "-A")
    git("commit", "-qm", "docs")
    assert reproduce.stale_mark(row, tmp_path) == ""
    (tmp_path / "diffgrm_dist" / "model.py").write_text("a = 2\n")
    git("add", "-A")
    git("commit", "-qm", "model again")
    assert reproduce.stale_mark(row, tmp_path) == f" [at {row['commit'][:7]}]"
    assert reproduce.stale_mark({"commit": "f" * 40}, tmp_path).endswith("not in this clone]")
    assert reproduce.last_quality_change(tmp_path).endswith("model again")
    # A change shown to leave every output the same, listed as neutral, leaves the row current.
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "neutral_commits.txt").write_text(
        f"# sha evidence\n{git('rev-parse', 'HEAD')} a rename; tiny outputs byte-identical\n")
    assert reproduce.stale_mark(row, tmp_path) == ""
    assert reproduce.last_quality_change(tmp_path).endswith(" model")


@pytest.mark.shared_data
def test_gpu_projection_counts_the_paper_config_on_beauty():
    require_amazon("beauty")
    import project_gpu

    m = project_gpu.measure("beauty")
    assert m["train_windows"] == 109_050 and m["steps_per_epoch"] == 109_050 // 1024  # = prepare's windows
    assert 5.0e6 < m["parameters"] < 6.0e6  # the paper's 5.6M
    # At least the dense matmuls of 6 x params FLOPs per decoder token (4 digits x 4 views).
    assert m["step"]["flops"] > 6 * m["parameters"] * 1024 * 4
    assert m["decode"]["test"]["flops_per_user"] > m["decode"]["valid"]["flops_per_user"]  # beam 256 vs 32
    fast = project_gpu.project(m, 989e12, 0.1, 8e-6)
    slow = project_gpu.project(m, 989e12, 0.05, 24e-6)
    assert 0 < fast["total_h"] < slow["total_h"]


def test_tuned_rows_show_the_best_on_validation_and_pairs_get_a_paired_interval(tmp_path):
    """A tune group shows only its best row by validation score; rows carrying per-user
    ranks are compared with the main row by the paired bootstrap; AR's seeds against
    DiffGRM's with Welch's interval."""
    from diffgrm_dist.evaluate.paired import sparse_ranks

    rng = np.random.default_rng(0)
    main_ranks = np.where(rng.random(5000) < 0.1, rng.integers(1, 11, 5000), 0)
    worse = main_ranks.copy()
    worse[np.nonzero(worse)[0][::3]] = 0
    rows = {"diffgrm": (0.030, main_ranks), "diffgrm_seed1": (0.031, None), "diffgrm_seed2": (0.029, None),
            "ar": (0.024, worse), "ar_seed1": (0.025, None), "ar_seed2": (0.023, None), "random_fill": (0.027, None)}
    for variant, (n10, ranks) in rows.items():
        result = _result("beauty", variant, n10, distinct=80 if variant == "random_fill" else 100)
        result["machine"] = "cpu: old" if variant in ("random_fill", "diffgrm_seed2") else "cpu: test"
        if ranks is not None:
            result["target_ranks"] = sparse_ranks(ranks)
        _write(tmp_path, result)
    for name, score in (("dense_do1_wd0", 0.2), ("dense_do3_wd1", 0.5), ("dense_do5_wd0", 0.4)):
        result = _result("beauty", name, 0.04)
        result["train"]["best_score"] = score
        _write(tmp_path, result)
    # random_fill was made beside seed 1's model on other SIDs, since re-run (now in history)
    reproduce.write_json(reproduce.history_path("beauty", "diffgrm_seed1", "1234567", tmp_path),
                         {**_result("beauty", "diffgrm_seed1", 0.033, distinct=80, commit="1234567abc"),
                          "machine": "cpu: old"})
    results = reproduce.load_results(tmp_path)["beauty"]
    assert reproduce.tuned_best(results) == {"dense": "dense_do3_wd1"}
    lines = reproduce.dataset_table("beauty", results, reproduce.load_history(tmp_path)["beauty"])
    dense = [line for line in lines if line.startswith("| dense baseline")]
    assert len(dense) == 1 and "dropout 0.3, weight decay 0.01" in dense[0] and "best of 3 settings" in dense[0]
    ar = next(line for line in lines if line.startswith("| AR baseline: same SIDs"))
    diff, lo, hi = reproduce.paired_difference(results["ar"], results["diffgrm"])
    assert lo < diff < hi < 0 and f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}] paired" in ar
    seed1 = next(line for line in lines if line.startswith("| DiffGRM, training seed 1"))
    assert "±" in seed1  # no per-user ranks: the seed-spread interval
    random_fill = next(line for line in lines if line.startswith("| ablation: CPD -> a fixed random fill order"))
    # against its pair's run on its SIDs: 0.027 - 0.033, not the current seed 1 (0.031) or main (0.030)
    assert "(vs diffgrm_seed1 at 1234567: the same SIDs)" in random_fill and "| -0.0060 ±" in random_fill
    assert "†" not in random_fill  # made on the machine of the run it is compared with
    assert "† |" in next(line for line in lines if line.startswith("| DiffGRM, training seed 2"))  # main's is another
    versus = next(line for line in lines if line.startswith("| DiffGRM (3 seeds) - AR (3 seeds)"))
    d, lo, hi, _, _ = reproduce.seeds_difference([results[n] for n in reproduce.SEEDS],
                                                 [results[n] for n in reproduce.AR_SEEDS])
    assert d == pytest.approx(0.006) and lo < d < hi and f"[{lo:+.4f}, {hi:+.4f}]" in versus
    assert any(line.startswith("*paired*") for line in lines)


def test_what_the_table_says_reads_each_claim_off_its_interval(tmp_path):
    """DiffGRM beats AR only where the Welch interval over the seeds excludes 0; an ablation
    goes the paper's way only where its paired interval is below 0; the tuned dense row is
    named with its setting next to the published SASRec figures; the section is in the README."""
    from diffgrm_dist.evaluate.paired import sparse_ranks

    rng = np.random.default_rng(1)
    base = np.where(rng.random(4000) < 0.12, rng.integers(1, 11, 4000), 0)

    def weaker(ranks, every):
        out = ranks.copy()
        out[np.nonzero(out)[0][::every]] = 0
        return out

    rows = {"diffgrm": (0.0300, base), "diffgrm_seed1": (0.0310, None), "diffgrm_seed2": (0.0305, None),
            "ar": (0.0200, weaker(base, 2)), "ar_seed1": (0.0210, None), "ar_seed2": (0.0205, None),
            "random_masking": (0.0250, weaker(base, 4)), "cpd_paper": (0.0300, base.copy()),
            "extra_digit": (0.0250, weaker(base, 5))}
    for variant, (n10, ranks) in rows.items():
        result = _result("beauty", variant, n10)
        if ranks is not None:
            result["target_ranks"] = sparse_ranks(ranks)
        _write(tmp_path, result)
    for name, score in (("dense_do1_wd0", 0.2), ("dense_do5_wd1", 0.3)):
        result = _result("beauty", name, 0.04)
        result["train"]["best_score"] = score
        _write(tmp_path, result)
    results = reproduce.load_results(tmp_path)["beauty"]
    said = {line.split("**")[1]: line for line in reproduce.findings("beauty", results)}
    d, lo, hi, _, _ = reproduce.seeds_difference([results[n] for n in reproduce.SEEDS],
                                                 [results[n] for n in reproduce.AR_SEEDS])
    assert lo > 0 and "DiffGRM beats AR at this budget" in said["DiffGRM vs AR"]
    assert f"difference {d:+.4f}, Welch 95% [{lo:+.4f}, {hi:+.4f}]" in said["DiffGRM vs AR"]
    assert "seed 0: " in said["DiffGRM vs AR"] and "seed 1: " not in said["DiffGRM vs AR"]  # only seed 0 has ranks
    masking = said["ablation: random masking instead of OCN"]
    diff, lo, hi = reproduce.paired_difference(results["random_masking"], results["diffgrm"])
    assert hi < 0 and f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}]" in masking and "the paper's way, resolved" in masking
    assert "-0.0117 SID N@10" in masking  # the paper: 0.0385 - 0.0502
    assert "no difference resolved" in said[reproduce.DEPARTURES["cpd_paper"]]
    diff, lo, hi = reproduce.paired_difference(results["extra_digit"], results["diffgrm"])
    assert hi < 0 and f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}]" in said[reproduce.OPTIONS["extra_digit"]]
    assert "lower with it" in said[reproduce.OPTIONS["extra_digit"]]
    dense = said["Dense baseline"]
    assert "best of 2 settings" in dense and "dropout 0.5, weight decay 0.01" in dense and "0.0318" in dense

    # Within the noise: AR's seeds spread over DiffGRM's, so neither wins.
    for variant, n10 in (("ar", 0.0290), ("ar_seed1", 0.0330), ("ar_seed2", 0.0280)):
        _write(tmp_path, {**results[variant], "metrics": _result("beauty", variant, n10)["metrics"]})
    results = reproduce.load_results(tmp_path)["beauty"]
    versus = next(line for line in reproduce.findings("beauty", results) if line.startswith("- **DiffGRM vs AR**"))
    assert "neither beats the other" in versus
    readme = reproduce.write_table(reproduce.load_results(tmp_path), tmp_path).read_text()
    assert "## What the table says" in readme and versus in readme
