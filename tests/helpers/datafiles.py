"""Writers of small raw datasets in each supported on-disk format, for tests."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

# user -> items, oldest first. u5 has only 2 items and is dropped by leave-one-out.
SEQUENCES = {
    "u1": ["A", "B", "C", "D", "E"],
    "u2": ["B", "C", "F"],
    "u3": ["G", "A", "B", "H", "C", "D"],
    "u4": ["F", "G", "H"],
    "u5": ["A", "B"],
}
TITLES = {"A": "Rose &amp; Oud  Perfume", "B": "Nail   Polish", "C": "Lip Balm", "D": "Hair Gel",
          "E": "Face Cream", "F": "Eye Liner", "G": "Shampoo", "H": "Soap", "Z": "Never Bought"}
CATEGORIES = {k: [["Beauty", "Makeup"], ["Beauty", "Skin"]] for k in TITLES}


def write_sequence_dataset(root: Path, sequences=SEQUENCES, titles=TITLES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "user_sequence.txt").write_text(
        "".join(f"{u} {' '.join(items)}\n" for u, items in sequences.items()))
    (root / "items.jsonl").write_text("".join(
        json.dumps({"asin": a, "title": t, "categories": CATEGORIES[a]}) + "\n"
        for a, t in titles.items()))
    (root / "item_phrases.txt").write_text("".join(f"{a} phrase of {a.lower()}\n" for a in titles))
    return root


def write_amazon_raw_dataset(root: Path, name: str = "Beauty") -> Path:
    """reviews_<name>_5.json.gz (JSON lines) + meta_<name>.json.gz (Python literals)."""
    root.mkdir(parents=True, exist_ok=True)
    reviews = []
    # Time stamps deliberately out of file order; a tie at t=300 resolves by file order.
    for user, items in SEQUENCES.items():
        for i, item in enumerate(items):
            reviews.append({"reviewerID": user, "asin": item, "reviewerName": "x",
                            "helpful": [0, 0], "reviewText": "fine", "overall": 5.0,
                            "summary": "ok", "unixReviewTime": 1_000 + 100 * i,
                            "reviewTime": "01 1, 2014"})
    reviews.reverse()
    with gzip.open(root / f"reviews_{name}_5.json.gz", "wt") as fh:
        for r in reviews:
            fh.write(json.dumps(r) + "\n")
    with gzip.open(root / f"meta_{name}.json.gz", "wt") as fh:
        for asin, title in TITLES.items():
            meta = {"asin": asin, "title": title, "price": 12.5, "imUrl": "http://x/y.jpg",
                    "related": {"also_bought": ["B"]}, "salesRank": {"Beauty": 10},
                    "categories": CATEGORIES[asin], "brand": f"Brand{asin}",
                    "description": "Nice.\n  Really nice."}
            fh.write(repr(meta) + "\n")
    return root


def write_movielens_dataset(root: Path, name: str = "ml-tiny") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    items = {"1": ("Toy Story", "1995", "Animation Children's Comedy"),
             "2": ("GoldenEye", "1995", "Action Adventure Thriller"),
             "3": ("Heat", "1995", "Action Crime"), "4": ("Babe", "1995", "Comedy Drama")}
    (root / f"{name}.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{k}\t{t}\t{y}\t{g}\n" for k, (t, y, g) in items.items()))
    inter = [("10", "3", 5, 300), ("10", "1", 4, 100), ("10", "2", 3, 200),
             ("20", "4", 2, 50), ("20", "2", 3, 50), ("20", "1", 1, 10)]
    (root / f"{name}.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in inter))
    return root
