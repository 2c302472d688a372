"""``RawData``: interactions and item fields as a reader (``readers.py``) or the synthetic
generator (``synthetic.py``) produced them, before prepare filters and splits them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa


@dataclass
class RawData:
    """Interactions and item fields as read, before filtering and splitting.

    ``items`` has a string column ``item_id``, one string column per text field, and an
    int column ``line`` (where the item was defined in ``item_source``, for errors).
    User ``u``'s items, oldest first, are ``items`` rows ``seq[offsets[u]:offsets[u+1]]``.
    """

    items: pa.Table
    item_source: str
    user_ids: pa.Array
    offsets: np.ndarray
    seq: np.ndarray
    sources: list[Path] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)
