"""Ragged-array helpers: rows of different lengths laid end to end in one flat array."""

from __future__ import annotations

import numpy as np


def ragged_positions(lengths: np.ndarray) -> np.ndarray:
    """Rows of these lengths laid end to end: each element's position within its row."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def left_pad_index(ends: np.ndarray, lengths: np.ndarray, width: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows of a flat array ending at ``ends``, where their last ``lengths`` elements go
    in a (rows, width) left-padded batch, the most recent in the last slot:
    (batch row, slot, position in the flat array) of every element placed."""
    lengths = np.asarray(lengths, dtype=np.int64)
    within = ragged_positions(lengths)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    slots = width - np.repeat(lengths, lengths) + within
    source = np.repeat(np.asarray(ends, dtype=np.int64) - lengths, lengths) + within
    return rows, slots, source
