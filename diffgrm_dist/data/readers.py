"""Readers of raw interaction data into one in-memory form, ``RawData``.

Formats:
- ``sequence``: ``user_sequence.txt`` (``USER ITEM ITEM ...`` in time order) plus item
  text from ``items.jsonl`` (title, categories) and/or ``item_phrases.txt`` (phrase),
  as in ``../shared/data/amazon2014/<name>/``.
- ``amazon_raw``: the original Amazon 2014 files ``reviews_<Name>_5.json.gz`` (one JSON
  review a line, ordered per user by ``unixReviewTime``) and ``meta_<Name>.json.gz``
  (one Python-literal dict a line: title, price, brand, categories, description).
- ``movielens``: RecBole atomic files ``<name>.inter`` / ``<name>.item`` (ML-100K ships
  inside the ``recbole`` package and is the embedded default): title, year, genres.
- ``synthetic``: see ``synthetic.py``.

Errors name the file and line (and field). What is dropped instead of failing is counted
in ``RawData.drops`` and reported by the prepare stage:
- blank lines (``blank_lines``).
Everything else that is malformed is an error: a missing file, a missing or mistyped
field, bytes that are not UTF-8, a duplicate user or item id, an interaction naming an
item that has no entry in the item files.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import re
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from diffgrm_dist.core.config import DataConfig
from diffgrm_dist.core.errors import ConfigError, DataError
from diffgrm_dist.data.rawdata import RawData
from diffgrm_dist.data.synthetic import generate
from diffgrm_dist.data.text import template_fields


def read_raw(cfg: DataConfig) -> RawData:
    """Dispatches on ``cfg.format``."""
    if cfg.format == "sequence":
        return read_sequence(cfg)
    if cfg.format == "amazon_raw":
        return read_amazon_raw(cfg)
    if cfg.format == "movielens":
        return read_movielens(cfg)
    if cfg.format == "synthetic":
        return generate(cfg.synthetic)
    raise ConfigError(f"data.format: unknown format {cfg.format!r}")


# --------------------------------------------------------------------------- helpers


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) for each line of a UTF-8 file, ``.gz`` or plain.

    Raises DataError naming the line of the first byte that is not UTF-8.
    """
    if not path.is_file():
        raise DataError(path, "file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(path, f"not UTF-8: byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}", line=number) from None
            yield number, text.rstrip("\r\n")


class _Users:
    """Collects per-user sequences of item rows into flat typed buffers (8 bytes an
    interaction, not a Python list of ints per user), then packs them as arrays."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.lines: dict[str, int] = {}
        self.flat = array("q")
        self.lengths = array("q")

    def add(self, user: str, items: list[int], path: Path, line: int) -> None:
        if user in self.lines:
            raise DataError(path, f"user {user!r} appears again (first on line "
                            f"{self.lines[user]})", line=line)
        self.lines[user] = line
        self.ids.append(user)
        self.flat.extend(items)
        self.lengths.append(len(items))

    def pack(self) -> tuple[pa.Array, np.ndarray, np.ndarray]:
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(self.lengths, dtype=np.int64), out=offsets[1:])
        return pa.array(self.ids, pa.string()), offsets, np.frombuffer(self.flat, dtype=np.int64).copy()


class _Items:
    """Item ids with their fields; rejects duplicates, naming both lines."""

    def __init__(self, source: Path, fields: list[str]) -> None:
        self.source = source
        self.fields = fields
        self.row: dict[str, int] = {}
        self.lines: list[int] = []
        self.values: dict[str, list[str]] = {f: [] for f in fields}

    def add(self, item: str, values: dict[str, str], line: int, path: Path | None = None) -> None:
        if item in self.row:
            raise DataError(path or self.source, f"duplicate item id {item!r} (first on line "
                            f"{self.lines[self.row[item]]})", line=line)
        self.row[item] = len(self.lines)
        self.lines.append(line)
        for f in self.fields:
            self.values[f].append(values.get(f, ""))

    def table(self) -> pa.Table:
        columns = {"item_id": pa.array(list(self.row), pa.string())}
        columns.update({f: pa.array(v, pa.string()) for f, v in self.values.items()})
        columns["line"] = pa.array(self.lines, pa.int64())
        return pa.table(columns)

    def lookup(self, item: str, path: Path, line: int) -> int:
        row = self.row.get(item)
        if row is None:
            raise DataError(path, f"interaction names unknown item {item!r} (not in "
                            f"{self.source.name})", line=line)
        return row


def _needed_fields(cfg: DataConfig, available: dict[str, str]) -> list[str]:
    """Template fields, checked against those the format provides (field -> file)."""
    needed = template_fields(cfg.text_template)
    unknown = [f for f in needed if f not in available]
    if unknown:
        raise ConfigError(f"data.text_template: format {cfg.format!r} has no fields {unknown}; "
                          f"it provides {sorted(available)}")
    return needed


def _join_categories(value: Any, path: Path, line: int) -> str:
    """Amazon ``categories``: a list of category paths -> unique names, in order."""
    if not isinstance(value, list) or not all(isinstance(p, list) for p in value):
        raise DataError(path, "must be a list of lists of strings", line=line, field="categories")
    names: dict[str, None] = {}
    for cat_path in value:
        for name in cat_path:
            if not isinstance(name, str):
                raise DataError(path, "must be a list of lists of strings", line=line,
                                field="categories")
            names.setdefault(name, None)
    return ", ".join(names)


def _string_field(record: dict[str, Any], name: str, path: Path, line: int) -> str:
    value = record.get(name)
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)  # descriptions are sometimes split into a list
    if not isinstance(value, str):
        raise DataError(path, f"must be a string, got {type(value).__name__}", line=line,
                        field=name)
    return value


def _required_str(record: dict[str, Any], name: str, path: Path, line: int) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value:
        problem = "missing" if name not in record else f"must be a non-empty string, got {value!r}"
        raise DataError(path, problem, line=line, field=name)
    return value


# --------------------------------------------------------------------------- sequence


_SEQUENCE_FIELDS = {"title": "items.jsonl", "categories": "items.jsonl", "phrase": "item_phrases.txt"}


def read_sequence(cfg: DataConfig) -> RawData:
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(root, "data folder not found")
    fields = _needed_fields(cfg, _SEQUENCE_FIELDS)
    files = [root / name for name in dict.fromkeys(_SEQUENCE_FIELDS[f] for f in fields)]
    drops = {"blank_lines": 0}
    items = _Items(files[0], fields)
    for path in files:
        if path.name == "items.jsonl":
            _read_items_jsonl(path, items, drops)
        else:
            _read_phrases(path, items, drops, first=path == files[0])
    users = _Users()
    seq_path = root / "user_sequence.txt"
    for number, line in iter_lines(seq_path):
        tokens = line.split()
        if not tokens:
            drops["blank_lines"] += 1
            continue
        users.add(tokens[0], [items.lookup(t, seq_path, number) for t in tokens[1:]], seq_path,
                  number)
    user_ids, offsets, flat = users.pack()
    return RawData(items.table(), str(items.source), user_ids, offsets, flat,
                   sources=[seq_path, *files], drops=drops)


def _read_items_jsonl(path: Path, items: _Items, drops: dict[str, int]) -> None:
    for number, line in iter_lines(path):
        if not line.strip():
            drops["blank_lines"] += 1
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"not valid JSON: {exc.msg}", line=number) from None
        if not isinstance(record, dict):
            raise DataError(path, "expected a JSON object", line=number)
        asin = _required_str(record, "asin", path, number)
        values = {"title": _string_field(record, "title", path, number)}
        if "categories" in record:
            values["categories"] = _join_categories(record["categories"], path, number)
        items.add(asin, values, number)


def _read_phrases(path: Path, items: _Items, drops: dict[str, int], first: bool) -> None:
    """``ASIN phrase words ...``; fills ``phrase`` of known items, or adds items if first."""
    seen: dict[str, int] = {}
    for number, line in iter_lines(path):
        asin, _, phrase = line.strip().partition(" ")
        if not asin:
            drops["blank_lines"] += 1
            continue
        if asin in seen:
            raise DataError(path, f"duplicate item id {asin!r} (first on line {seen[asin]})",
                            line=number)
        seen[asin] = number
        if first:
            items.add(asin, {"phrase": phrase}, number, path)
        else:
            row = items.row.get(asin)
            if row is None:
                raise DataError(path, f"item {asin!r} is not in {items.source.name}", line=number)
            items.values["phrase"][row] = phrase


# --------------------------------------------------------------------------- amazon raw


_AMAZON_FIELDS = {f: "meta" for f in ("title", "brand", "categories", "price", "description")}
_ASIN_RE = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


def read_amazon_raw(cfg: DataConfig) -> RawData:
    root = Path(cfg.path)
    if not cfg.name:
        raise ConfigError("data.name: amazon_raw needs the category of the file names, e.g. Beauty")
    reviews_path = root / f"reviews_{cfg.name}_5.json.gz"
    meta_path = root / f"meta_{cfg.name}.json.gz"
    fields = _needed_fields(cfg, _AMAZON_FIELDS)
    drops = {"blank_lines": 0}

    user_of: dict[str, int] = {}
    item_of: dict[str, int] = {}
    review_users: list[int] = []
    review_items: list[int] = []
    review_times: list[int] = []
    review_lines: list[int] = []
    item_first_line: dict[str, int] = {}
    for number, line in iter_lines(reviews_path):
        if not line.strip():
            drops["blank_lines"] += 1
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(reviews_path, f"not valid JSON: {exc.msg}", line=number) from None
        if not isinstance(record, dict):
            raise DataError(reviews_path, "expected a JSON object", line=number)
        user = _required_str(record, "reviewerID", reviews_path, number)
        asin = _required_str(record, "asin", reviews_path, number)
        when = record.get("unixReviewTime")
        if isinstance(when, bool) or not isinstance(when, int):
            raise DataError(reviews_path, f"must be an integer, got {when!r}", line=number,
                            field="unixReviewTime")
        review_users.append(user_of.setdefault(user, len(user_of)))
        review_items.append(item_of.setdefault(asin, len(item_of)))
        item_first_line.setdefault(asin, number)
        review_times.append(when)
        review_lines.append(number)

    # Only the reviewed items' metadata lines are parsed in full: the category-wide meta
    # file is an order of magnitude larger than the 5-core review set.
    items = _Items(meta_path, fields)
    for number, line in iter_lines(meta_path):
        if not line.strip():
            drops["blank_lines"] += 1
            continue
        match = _ASIN_RE.search(line)
        if match is None:
            raise DataError(meta_path, "missing", line=number, field="asin")
        if match.group(1) not in item_of:
            continue
        record = _parse_meta_line(line, meta_path, number)
        asin = _required_str(record, "asin", meta_path, number)
        values = {name: _string_field(record, name, meta_path, number)
                  for name in ("title", "brand", "price", "description") if name in fields}
        if "categories" in fields and "categories" in record:
            values["categories"] = _join_categories(record["categories"], meta_path, number)
        items.add(asin, values, number)
    for asin, first in item_first_line.items():
        if asin not in items.row:
            raise DataError(reviews_path, f"interaction names unknown item {asin!r} (not in "
                            f"{meta_path.name})", line=first)

    users_arr = np.asarray(review_users, dtype=np.int64)
    # Stable order: by user, then time, then file order.
    order = np.lexsort((np.asarray(review_lines), np.asarray(review_times), users_arr))
    reviewed_row = np.array([items.row[a] for a in item_of], dtype=np.int64)
    flat = reviewed_row[np.asarray(review_items, dtype=np.int64)[order]]
    counts = np.bincount(users_arr, minlength=len(user_of))
    offsets = np.zeros(len(user_of) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return RawData(items.table(), str(meta_path), pa.array(list(user_of), pa.string()), offsets,
                   flat, sources=[reviews_path, meta_path], drops=drops)


def _parse_meta_line(line: str, path: Path, number: int) -> dict[str, Any]:
    """Meta lines are Python literals (single quotes) in the 2014 dump; JSON also accepted."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError) as exc:
            raise DataError(path, f"neither JSON nor a Python literal: {exc}", line=number) from None
    if not isinstance(record, dict):
        raise DataError(path, "expected a mapping", line=number)
    return record


# --------------------------------------------------------------------------- movielens


_MOVIELENS_FIELDS = {"title": "item", "year": "item", "genres": "item"}
_MOVIELENS_ITEM_COLUMNS = {"item_id": "item_id", "movie_title": "title", "release_year": "year",
                           "class": "genres"}


def movielens_default_path() -> Path:
    """ML-100K as shipped in the recbole package (found without importing recbole)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise DataError("recbole", "package not installed: `pip install --no-deps recbole==1.2.1` "
                        "provides the embedded ML-100K, or set data.path")
    return Path(spec.origin).parent / "dataset_example" / "ml-100k"


def _atomic_header(path: Path, line: str, required: list[str]) -> dict[str, int]:
    names = [col.split(":")[0] for col in line.split("\t")]
    for name in required:
        if name not in names:
            raise DataError(path, f"missing column (header has {names})", line=1, field=name)
    return {name: names.index(name) for name in required}


def read_movielens(cfg: DataConfig) -> RawData:
    root = Path(cfg.path) if cfg.path else movielens_default_path()
    name = cfg.name or root.name
    inter_path, item_path = root / f"{name}.inter", root / f"{name}.item"
    fields = _needed_fields(cfg, _MOVIELENS_FIELDS)
    drops = {"blank_lines": 0}

    items = _Items(item_path, fields)
    cols: dict[str, int] = {}
    for number, line in iter_lines(item_path):
        if number == 1:
            cols = _atomic_header(item_path, line, list(_MOVIELENS_ITEM_COLUMNS))
            continue
        if not line.strip():
            drops["blank_lines"] += 1
            continue
        parts = line.split("\t")
        if len(parts) <= max(cols.values()):
            raise DataError(item_path, f"expected {max(cols.values()) + 1} tab-separated columns, "
                            f"got {len(parts)}", line=number)
        values = {_MOVIELENS_ITEM_COLUMNS[c]: parts[i] for c, i in cols.items() if c != "item_id"}
        values["genres"] = ", ".join(values["genres"].split())
        items.add(_nonempty(parts[cols["item_id"]], item_path, number, "item_id"), values, number)

    users: dict[str, list[tuple[float, int, int]]] = {}
    for number, line in iter_lines(inter_path):
        if number == 1:
            cols = _atomic_header(inter_path, line, ["user_id", "item_id", "timestamp"])
            continue
        if not line.strip():
            drops["blank_lines"] += 1
            continue
        parts = line.split("\t")
        if len(parts) <= max(cols.values()):
            raise DataError(inter_path, f"expected {max(cols.values()) + 1} tab-separated "
                            f"columns, got {len(parts)}", line=number)
        try:
            when = float(parts[cols["timestamp"]])
        except ValueError:
            raise DataError(inter_path, f"not a number: {parts[cols['timestamp']]!r}", line=number,
                            field="timestamp") from None
        user = _nonempty(parts[cols["user_id"]], inter_path, number, "user_id")
        row = items.lookup(parts[cols["item_id"]], inter_path, number)
        users.setdefault(user, []).append((when, number, row))
    collected = _Users()
    for user, events in users.items():
        events.sort()  # by time, then file order
        collected.ids.append(user)
        collected.flat.extend(row for _, _, row in events)
        collected.lengths.append(len(events))
    user_ids, offsets, flat = collected.pack()
    return RawData(items.table(), str(item_path), user_ids, offsets, flat,
                   sources=[inter_path, item_path], drops=drops)


def _nonempty(value: str, path: Path, line: int, name: str) -> str:
    if not value.strip():
        raise DataError(path, "empty", line=line, field=name)
    return value.strip()


def source_files(cfg: DataConfig) -> list[Path]:
    """The files ``read_raw`` will read for this config (for input hashes); may not exist."""
    if cfg.format == "sequence":
        fields = template_fields(cfg.text_template)
        names = ["user_sequence.txt", *dict.fromkeys(_SEQUENCE_FIELDS[f] for f in fields
                                                      if f in _SEQUENCE_FIELDS)]
        return [Path(cfg.path) / n for n in names]
    if cfg.format == "amazon_raw":
        root = Path(cfg.path)
        return [root / f"reviews_{cfg.name}_5.json.gz", root / f"meta_{cfg.name}.json.gz"]
    if cfg.format == "movielens":
        root = Path(cfg.path) if cfg.path else movielens_default_path()
        name = cfg.name or root.name
        return [root / f"{name}.inter", root / f"{name}.item"]
    return []
