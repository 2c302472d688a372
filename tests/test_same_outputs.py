"""tools/same_outputs.py: identical stage outputs pass, a changed result file is named,
and what differs by nature (timings, node ids, the tracker's log) is ignored."""

import json

import same_outputs


def write_run(root, weights: bytes, decode_s: float, node: str):
    (root / "train" / "wandb").mkdir(parents=True)
    (root / "train" / "model.safetensors").write_bytes(weights)
    (root / "train" / "wandb" / "run.wandb").write_bytes(node.encode())
    (root / "train" / "manifest.json").write_text(json.dumps({"created": decode_s}))
    (root / "evaluate").mkdir()
    (root / "evaluate" / "metrics.json").write_text(
        json.dumps({"item": {"ndcg@10": 0.25}, "decode_s": decode_s, "nodes": [node]}))


def test_same_outputs_ignore_timings_and_name_a_changed_file(tmp_path):
    write_run(tmp_path / "a", b"weights", 1.0, "n1")
    write_run(tmp_path / "b", b"weights", 2.5, "n2")
    report = same_outputs.compare(tmp_path / "a", tmp_path / "b")
    assert set(report) == {"train", "evaluate"} and all(r["same"] for r in report.values())
    (tmp_path / "b" / "train" / "model.safetensors").write_bytes(b"weightz")
    metrics = tmp_path / "b" / "evaluate" / "metrics.json"
    metrics.write_text(metrics.read_text().replace("0.25", "0.26"))
    report = same_outputs.compare(tmp_path / "a", tmp_path / "b")
    assert report["train"]["differ"] == ["model.safetensors"]
    assert report["evaluate"]["differ"] == ["metrics.json"]
