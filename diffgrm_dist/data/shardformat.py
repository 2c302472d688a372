"""The shard stage's sample format, which the writer (``shard.py``) and the training
loaders (``loaders.py``) share: one WebDataset tar member per window, and the per-split
sample index (``index.npy``) for random access."""

from __future__ import annotations

from typing import Any

import numpy as np

SPLITS = ("train", "valid", "test")

HEADER = np.dtype([("user", "<i4"), ("item", "<i4"), ("length", "<i4")])

INDEX_NAME = "index.npy"
# One row per sample, in sample order: its shard's number, where its ``win`` bytes start in
# that tar and how many there are, and its history length (for length bucketing).
INDEX_DTYPE = np.dtype([("shard", "<i8"), ("offset", "<i8"), ("size", "<i8"), ("length", "<i8")])


def encode_window(user: int, item: int, target: np.ndarray, history: np.ndarray) -> bytes:
    """One window as a single tar member: (user, item, length) int32, then int16 target
    digits and history digits. One small member per sample keeps a shard near 1 KB/sample
    (tar pads every member to 512 bytes)."""
    header = np.array([(user, item, len(history))], dtype=HEADER).tobytes()
    return header + target.astype("<i2").tobytes() + history.astype("<i2").tobytes()


def decode_window(data: bytes, digits: int) -> dict[str, Any]:
    header = np.frombuffer(data, dtype=HEADER, count=1)[0]
    codes = np.frombuffer(data, dtype="<i2", offset=HEADER.itemsize)
    return {"user": int(header["user"]), "item": int(header["item"]), "tgt": codes[:digits],
            "hist": codes[digits:].reshape(int(header["length"]), digits)}
