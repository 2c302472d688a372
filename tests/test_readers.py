import numpy as np
import pytest
from helpers.datafiles import SEQUENCES, write_amazon_raw_dataset, write_movielens_dataset, write_sequence_dataset

from diffgrm_dist.core.config import DataConfig, SyntheticConfig
from diffgrm_dist.core.errors import ConfigError
from diffgrm_dist.data.rawdata import RawData
from diffgrm_dist.data.readers import read_raw
from diffgrm_dist.data.synthetic import generate


def sequences_of(raw: RawData) -> dict[str, list[str]]:
    ids = raw.items["item_id"].to_pylist()
    return {u: [ids[i] for i in raw.seq[raw.offsets[k]:raw.offsets[k + 1]]]
            for k, u in enumerate(raw.user_ids.to_pylist())}


def test_sequence_reader(tmp_path):
    root = write_sequence_dataset(tmp_path / "seq")
    raw = read_raw(DataConfig(format="sequence", path=str(root),
                              text_template=["{title}", "{categories}", "{phrase}"]))
    assert sequences_of(raw) == SEQUENCES
    row = raw.items["item_id"].to_pylist().index("A")
    assert raw.items["title"][row].as_py() == "Rose &amp; Oud  Perfume"  # cleaned later
    assert raw.items["categories"][row].as_py() == "Beauty, Makeup, Skin"
    assert raw.items["phrase"][row].as_py() == "phrase of a"


def test_sequence_reader_reads_only_the_files_the_template_needs(tmp_path):
    root = write_sequence_dataset(tmp_path / "seq")
    (root / "items.jsonl").unlink()
    raw = read_raw(DataConfig(format="sequence", path=str(root), text_template=["{phrase}"]))
    assert raw.items.column_names == ["item_id", "phrase", "line"]
    with pytest.raises(ConfigError, match="no fields"):
        read_raw(DataConfig(format="sequence", path=str(root), text_template=["{brand}"]))


def test_amazon_raw_reader_orders_by_time_and_parses_python_literal_meta(tmp_path):
    root = write_amazon_raw_dataset(tmp_path / "raw")
    raw = read_raw(DataConfig(format="amazon_raw", path=str(root), name="Beauty",
                              text_template=["{title}", "{brand}", "{price}", "{description}"]))
    assert sequences_of(raw) == SEQUENCES  # file order was reversed; time order restores it
    row = raw.items["item_id"].to_pylist().index("C")
    assert raw.items["brand"][row].as_py() == "BrandC"
    assert raw.items["price"][row].as_py() == "12.5"
    assert "Z" not in raw.items["item_id"].to_pylist()  # meta of unreviewed items is skipped


def test_amazon_raw_ties_keep_file_order(tmp_path):
    import gzip
    import json

    root = write_amazon_raw_dataset(tmp_path / "raw")
    with gzip.open(root / "reviews_Beauty_5.json.gz", "wt") as fh:
        for asin in ["C", "A", "B"]:
            fh.write(json.dumps({"reviewerID": "u", "asin": asin, "unixReviewTime": 7}) + "\n")
    raw = read_raw(DataConfig(format="amazon_raw", path=str(root), name="Beauty"
                              , text_template=["{title}"]))
    assert sequences_of(raw) == {"u": ["C", "A", "B"]}


def test_movielens_reader_on_written_files(tmp_path):
    root = write_movielens_dataset(tmp_path / "ml")
    raw = read_raw(DataConfig(format="movielens", path=str(root), name="ml-tiny",
                              text_template=["{title}", "{year}", "{genres}"]))
    assert sequences_of(raw) == {"10": ["1", "2", "3"], "20": ["1", "4", "2"]}
    row = raw.items["item_id"].to_pylist().index("1")
    assert raw.items["genres"][row].as_py() == "Animation, Children's, Comedy"
    assert raw.items["year"][row].as_py() == "1995"


def test_movielens_reader_on_embedded_ml100k():
    raw = read_raw(DataConfig(format="movielens", path=""))
    assert len(raw.user_ids) == 943
    assert raw.items.num_rows == 1682
    assert int(raw.offsets[-1]) == 100_000


def test_synthetic_generator_is_seeded_and_shaped():
    cfg = SyntheticConfig(items=2_000, interactions=30_000, categories=20, seed=3)
    a, b = generate(cfg), generate(cfg)
    assert np.array_equal(a.seq, b.seq) and a.items.equals(b.items)
    c = generate(SyntheticConfig(items=2_000, interactions=30_000, categories=20, seed=4))
    assert not np.array_equal(a.seq[:1000], c.seq[:1000])
    lengths = np.diff(a.offsets)
    assert int(a.offsets[-1]) == 30_000 and lengths.min() >= 3
    assert abs(lengths.mean() - cfg.mean_user_items) < 1.5

    counts = np.sort(np.bincount(a.seq, minlength=2_000))[::-1]
    assert counts[:20].sum() > 10 * counts[1000:1020].sum()  # power-law popularity

    # Sessions stay in a category: consecutive items share it far more often than chance.
    cat = np.asarray([s.split(", ")[1] for s in a.items["categories"].to_pylist()])[a.seq]
    same_user = np.repeat(np.arange(len(lengths)), lengths)
    pairs = same_user[1:] == same_user[:-1]
    same_cat = (cat[1:] == cat[:-1])[pairs].mean()
    shuffled = np.random.default_rng(0).permutation(cat)
    assert same_cat > 3 * (shuffled[1:] == shuffled[:-1]).mean()
    # Item text is drawn from the item's category vocabulary.
    titles = a.items["title"].to_pylist()
    assert len(set(titles)) > 1_500


def test_synthetic_generator_refuses_more_categories_than_its_vocabulary():
    """Each category draws its own words; past the vocabulary it would search forever."""
    from diffgrm_dist.core.config import SyntheticConfig
    from diffgrm_dist.data.synthetic import generate

    with pytest.raises(ConfigError, match=r"data.synthetic.categories: 1,302,256 distinct words needed"):
        generate(SyntheticConfig(items=100_000, interactions=1_000, categories=20_000))
