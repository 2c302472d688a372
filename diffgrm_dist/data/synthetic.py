"""Seeded synthetic catalogues and users, for scale tests of every stage.

Items belong to categories (category sizes follow a power law); within a category item
popularity is Zipf-like. Item text is drawn from the category's own vocabulary, so text
embeddings (and therefore semantic IDs) cluster by category. Users have a home category
and shop in sessions: each session stays in one category (the home one with probability
``home_category_prob``) and draws its items by popularity. Everything is vectorised with
numpy / pyarrow compute: 1M items and 10M interactions take seconds, not minutes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diffgrm_dist.core.config import SyntheticConfig
from diffgrm_dist.core.errors import ConfigError
from diffgrm_dist.data.rawdata import RawData

_CONSONANTS = list("bcdfghjklmnprstvz")
_VOWELS = list("aeiou")
_WORDS_PER_CATEGORY = 48
_BRANDS_PER_CATEGORY = 16
_ADJECTIVES = 256


_SYLLABLES = len(_CONSONANTS) * len(_VOWELS)
MAX_WORDS = _SYLLABLES ** 2 + _SYLLABLES ** 3  # distinct 2-3 syllable words there are


def _words(rng: np.random.Generator, count: int) -> list[str]:
    """Distinct pronounceable pseudo-words of 2-3 syllables."""
    if count > MAX_WORDS:
        raise ConfigError(f"data.synthetic.categories: {count:,} distinct words needed, only "
                          f"{MAX_WORDS:,} exist; use fewer categories")
    words: dict[str, None] = {}
    while len(words) < count:
        syllables = rng.integers(2, 4)
        letters = [f"{_CONSONANTS[c]}{_VOWELS[v]}" for c, v in zip(
            rng.integers(0, len(_CONSONANTS), syllables), rng.integers(0, len(_VOWELS), syllables))]
        words.setdefault("".join(letters), None)
    return list(words)


def _zipf_weights(n: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


def generate(cfg: SyntheticConfig) -> RawData:
    if cfg.items < cfg.categories or cfg.categories < 1:
        raise ConfigError("data.synthetic: need items >= categories >= 1")
    if cfg.mean_user_items < 3 or cfg.interactions < 3:
        raise ConfigError("data.synthetic: mean_user_items and interactions must be >= 3")
    rng = np.random.default_rng(cfg.seed)
    n_cat = cfg.categories

    # Catalogue: items grouped by category, popularity Zipf within each category.
    cat_weights = _zipf_weights(n_cat, 0.8)
    cat_sizes = np.bincount(rng.choice(n_cat, cfg.items, p=cat_weights), minlength=n_cat)
    cat_sizes = np.maximum(cat_sizes, 1)
    cat_sizes[np.argmax(cat_sizes)] -= cat_sizes.sum() - cfg.items
    item_cat = np.repeat(np.arange(n_cat), cat_sizes)
    cat_start = np.concatenate([[0], np.cumsum(cat_sizes)[:-1]])
    rank_in_cat = np.arange(cfg.items) - cat_start[item_cat]
    popularity = (rank_in_cat + 1.0) ** -cfg.popularity_exponent
    cdf = np.cumsum(popularity)
    cdf_start = np.concatenate([[0.0], cdf])[cat_start]
    cdf_mass = cdf[cat_start + cat_sizes - 1] - cdf_start

    items = _item_table(rng, item_cat, n_cat)

    # Users: lengths >= 3 with the configured mean, summing to exactly `interactions`.
    n_users_guess = int(np.ceil(cfg.interactions / cfg.mean_user_items * 1.2)) + 1
    p = 1.0 / max(cfg.mean_user_items - 2.0, 1.0)
    lengths = 2 + rng.geometric(p, size=n_users_guess)
    ends = np.cumsum(lengths)
    keep = int(np.searchsorted(ends, cfg.interactions, side="right"))
    lengths = lengths[:keep]
    rest = cfg.interactions - int(lengths.sum())
    if rest >= 3 or keep == 0:
        lengths = np.append(lengths, rest)
    else:
        lengths[-1] += rest
    n_users = len(lengths)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])

    # Sessions: a new one starts at each user's first item and then with p = 1/mean length.
    user_of = np.repeat(np.arange(n_users), lengths)
    starts = rng.random(total) < 1.0 / cfg.mean_session_items
    starts[offsets[:-1]] = True
    session_of = np.cumsum(starts) - 1
    session_user = user_of[starts]
    home = rng.choice(n_cat, n_users, p=cat_weights)
    stays = rng.random(len(session_user)) < cfg.home_category_prob
    session_cat = np.where(stays, home[session_user], rng.choice(n_cat, len(session_user), p=cat_weights))

    # Items: inverse-CDF sampling inside each interaction's category block.
    cat = session_cat[session_of]
    target = cdf_start[cat] + rng.random(total) * cdf_mass[cat]
    seq = np.searchsorted(cdf, target, side="left")
    seq = np.clip(seq, cat_start[cat], cat_start[cat] + cat_sizes[cat] - 1).astype(np.int64)

    user_ids = pc.binary_join_element_wise("u", pc.cast(pa.array(np.arange(n_users)), pa.string()), "")
    return RawData(items, "synthetic", user_ids, offsets, seq, sources=[], drops={"blank_lines": 0})


def _item_table(rng: np.random.Generator, item_cat: np.ndarray, n_cat: int) -> pa.Table:
    """Titles, brands, categories and prices drawn from per-category vocabularies."""
    n = len(item_cat)
    n_groups = max(1, n_cat // 10)
    vocab = pa.array(_words(rng, n_cat * (_WORDS_PER_CATEGORY + _BRANDS_PER_CATEGORY)
                            + _ADJECTIVES + n_cat + n_groups))
    nouns_at = _ADJECTIVES
    brands_at = nouns_at + n_cat * _WORDS_PER_CATEGORY
    cats_at = brands_at + n_cat * _BRANDS_PER_CATEGORY
    groups_at = cats_at + n_cat

    def noun() -> np.ndarray:
        return nouns_at + item_cat * _WORDS_PER_CATEGORY + rng.integers(0, _WORDS_PER_CATEGORY, n)

    adjective = rng.integers(0, _ADJECTIVES, n)
    title = pc.binary_join_element_wise(vocab.take(adjective), vocab.take(noun()),
                                        vocab.take(noun()), " ")
    brand = vocab.take(brands_at + item_cat * _BRANDS_PER_CATEGORY
                       + rng.integers(0, _BRANDS_PER_CATEGORY, n))
    categories = pc.binary_join_element_wise(vocab.take(groups_at + item_cat % n_groups),
                                             vocab.take(cats_at + item_cat), ", ")
    price = pc.cast(pc.round(pa.array(rng.lognormal(3.0, 0.8, n)), 2), pa.string())
    item_id = pc.binary_join_element_wise("i", pc.cast(pa.array(np.arange(n)), pa.string()), "")
    return pa.table({"item_id": item_id, "title": title, "brand": brand,
                     "categories": categories, "price": price,
                     "line": pa.array(np.arange(1, n + 1, dtype=np.int64))})
