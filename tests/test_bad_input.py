"""Each kind of bad input: one clear error naming file and line/field, nothing written."""

import json
import re

import pytest
from helpers.datafiles import SEQUENCES, write_amazon_raw_dataset, write_movielens_dataset, write_sequence_dataset


def run_prepare(run_cli, tmp_path, data_dir, *overrides):
    config = tmp_path / "cfg.yaml"
    config.write_text("data:\n  format: sequence\n  text_template: ['{title}']\n")
    out = tmp_path / "run"
    code, stdout, stderr = run_cli("prepare", "-c", config, "-o", out, f"data.path={data_dir}",
                                   *overrides)
    return code, stdout, stderr, out


def assert_clean_failure(code, stderr, out, pattern):
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr  # one message, no traceback
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists() or list(out.iterdir()) == [], "partial output left behind"


def test_missing_file(tmp_path, run_cli):
    data = write_sequence_dataset(tmp_path / "d")
    (data / "user_sequence.txt").unlink()
    code, _, err, out = run_prepare(run_cli, tmp_path, data)
    assert_clean_failure(code, err, out, r"user_sequence\.txt: file not found")


def test_missing_data_folder(tmp_path, run_cli):
    code, _, err, out = run_prepare(run_cli, tmp_path, tmp_path / "nowhere")
    assert_clean_failure(code, err, out, r"nowhere: data folder not found")


def test_wrong_column_in_atomic_header(tmp_path, run_cli):
    data = write_movielens_dataset(tmp_path / "ml")
    inter = data / "ml-tiny.inter"
    inter.write_text(inter.read_text().replace("timestamp:float", "time:float"))
    code, _, err, out = run_prepare(run_cli, tmp_path, data, "data.format=movielens",
                                    "data.name=ml-tiny")
    assert_clean_failure(code, err, out, r"ml-tiny\.inter:1 \(field 'timestamp'\): missing column")


def test_missing_field_in_jsonl(tmp_path, run_cli):
    data = write_sequence_dataset(tmp_path / "d")
    lines = (data / "items.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"title": "no asin here"})
    (data / "items.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err, out = run_prepare(run_cli, tmp_path, data)
    assert_clean_failure(code, err, out, r"items\.jsonl:3 \(field 'asin'\): missing")


def test_missing_review_time_in_amazon_raw(tmp_path, run_cli):
    import gzip

    data = write_amazon_raw_dataset(tmp_path / "raw")
    path = data / "reviews_Beauty_5.json.gz"
    lines = gzip.open(path, "rt").read().splitlines()
    record = json.loads(lines[4])
    del record["unixReviewTime"]
    lines[4] = json.dumps(record)
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    code, _, err, out = run_prepare(run_cli, tmp_path, data, "data.format=amazon_raw",
                                    "data.name=Beauty")
    assert_clean_failure(code, err, out,
                         r"reviews_Beauty_5\.json\.gz:5 \(field 'unixReviewTime'\): must be an integer")


def test_invalid_json_line(tmp_path, run_cli):
    data = write_sequence_dataset(tmp_path / "d")
    with open(data / "items.jsonl", "a") as fh:
        fh.write('{"asin": "Q", "title": \n')
    code, _, err, out = run_prepare(run_cli, tmp_path, data)
    assert_clean_failure(code, err, out, r"items\.jsonl:10: not valid JSON")


def test_empty_lines_are_counted_drops(tmp_path, run_cli):
    data = write_sequence_dataset(tmp_path / "d")
    text = (data / "user_sequence.txt").read_text().splitlines()
    text.insert(2, "   ")
    (data / "user_sequence.txt").write_text("\n".join(text) + "\n")
    code, stdout, _, out = run_prepare(run_cli, tmp_path, data)
    assert code == 0
    stats = json.loads((out / "prepare" / "stats.json").read_text())
    assert stats["dropped"]["blank_lines"] == 1 and stats["users"] == 4


def test_short_users_are_counted_drops(tmp_path, run_cli):
    data = write_sequence_dataset(tmp_path / "d")
    code, _, _, out = run_prepare(run_cli, tmp_path, data)
    assert code == 0
    stats = json.loads((out / "prepare" / "stats.json").read_text())
    assert stats["dropped"]["short_users"] == sum(len(s) < 3 for s in SEQUENCES.values()) == 1
    # With a stricter minimum the 3-item users go too.
    code, _, _, out = run_prepare(run_cli, tmp_path, data, "data.min_user_items=4")
    stats = json.loads((out / "prepare" / "stats.json").read_text())
    assert stats["dropped"]["short_users"] == 3 and stats["users"] == 2


def test_user_with_no_items_at_all_is_a_short_user(tmp_path, run_cli):
    data = write_sequence_dataset(tmp_path / "d", sequences={**SEQUENCES, "u9": []})
    code, _, _, out = run_prepare(run_cli, tmp_path, data)
    assert code == 0
    assert json.loads((out / "prepare" / "stats.json").read_text())["dropped"]["short_users"] == 2


def test_item_with_no_text(tmp_path, run_cli):
    from helpers.datafiles import TITLES

    data = write_sequence_dataset(tmp_path / "d", titles={**TITLES, "C": "  "})
    code, _, err, out = run_prepare(run_cli, tmp_path, data)
    assert_clean_failure(code, err, out, r"items\.jsonl:3 \(field 'text'\): item 'C' has no text")


def test_duplicate_item_ids(tmp_path, run_cli):
    data = write_sequence_dataset(tmp_path / "d")
    with open(data / "items.jsonl", "a") as fh:
        fh.write(json.dumps({"asin": "B", "title": "again"}) + "\n")
    code, _, err, out = run_prepare(run_cli, tmp_path, data)
    assert_clean_failure(code, err, out, r"items\.jsonl:10: duplicate item id 'B' \(first on line 2\)")


def test_duplicate_user_ids(tmp_path, run_cli):
    data = write_sequence_dataset(tmp_path / "d")
    with open(data / "user_sequence.txt", "a") as fh:
        fh.write("u2 A B C\n")
    code, _, err, out = run_prepare(run_cli, tmp_path, data)
    assert_clean_failure(code, err, out, r"user_sequence\.txt:6: user 'u2' appears again")


def test_non_utf8_bytes(tmp_path, run_cli):
    data = write_sequence_dataset(tmp_path / "d")
    raw = (data / "user_sequence.txt").read_bytes().splitlines(keepends=True)
    raw[2] = raw[2].replace(b"G", b"G\xff")
    (data / "user_sequence.txt").write_bytes(b"".join(raw))
    code, _, err, out = run_prepare(run_cli, tmp_path, data)
    assert_clean_failure(code, err, out, r"user_sequence\.txt:3: not UTF-8: byte 0xff at column 5")


def test_interaction_with_unknown_item(tmp_path, run_cli):
    data = write_sequence_dataset(tmp_path / "d", sequences={**SEQUENCES, "u7": ["A", "NOPE", "B"]})
    code, _, err, out = run_prepare(run_cli, tmp_path, data)
    assert_clean_failure(code, err, out, r"user_sequence\.txt:6: interaction names unknown item 'NOPE'")


def test_unknown_item_in_amazon_reviews(tmp_path, run_cli):
    import gzip

    data = write_amazon_raw_dataset(tmp_path / "raw")
    with gzip.open(data / "reviews_Beauty_5.json.gz", "at") as fh:
        fh.write(json.dumps({"reviewerID": "u1", "asin": "GONE", "unixReviewTime": 5}) + "\n")
    code, _, err, out = run_prepare(run_cli, tmp_path, data, "data.format=amazon_raw",
                                    "data.name=Beauty")
    assert_clean_failure(code, err, out, r"reviews_Beauty_5\.json\.gz:20: interaction names unknown "
                                         r"item 'GONE' \(not in meta_Beauty\.json\.gz\)")


@pytest.mark.parametrize("bad", ["train.epochs=x", "data.colour=red"])
def test_bad_config_is_one_clear_error(tmp_path, run_cli, bad):
    data = write_sequence_dataset(tmp_path / "d")
    code, _, err, out = run_prepare(run_cli, tmp_path, data, bad)
    assert_clean_failure(code, err, out, r"override")


def test_failure_keeps_a_previous_good_stage(tmp_path, run_cli):
    data = write_sequence_dataset(tmp_path / "d")
    code, _, _, out = run_prepare(run_cli, tmp_path, data)
    assert code == 0
    before = (out / "prepare" / "manifest.json").read_text()
    with open(data / "user_sequence.txt", "a") as fh:
        fh.write("u8 A NOPE B\n")
    code, _, err, _ = run_prepare(run_cli, tmp_path, data)
    assert code == 2 and "NOPE" in err
    assert (out / "prepare" / "manifest.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["prepare"]
