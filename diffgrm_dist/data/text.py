"""Item text: render a template over an item's fields, then clean it, column-wise.

A template is a list of segments such as ``["Title: {title}", "Brand: {brand}"]``. A
segment whose fields are all present is rendered; a segment naming an empty field is
dropped whole (no dangling ``Brand:``). Kept segments are joined by a separator. The work
is done with pyarrow compute so a million-item catalogue renders in about a second.
"""

from __future__ import annotations

import html
import string

import pyarrow as pa
import pyarrow.compute as pc

from diffgrm_dist.core.errors import ConfigError


def template_fields(template: list[str]) -> list[str]:
    """Names of the fields a template uses, in order of first use."""
    names: list[str] = []
    for segment in template:
        try:
            parsed = list(string.Formatter().parse(segment))
        except ValueError as exc:
            raise ConfigError(f"data.text_template: bad segment {segment!r}: {exc}") from exc
        for _, name, spec, conv in parsed:
            if name is None:
                continue
            if not name.isidentifier() or spec or conv:
                raise ConfigError(f"data.text_template: segment {segment!r} must use plain "
                                  f"{{field}} names, got {{{name}}}")
            if name not in names:
                names.append(name)
    return names


def render_text(fields: pa.Table, template: list[str], separator: str,
                max_chars: int) -> pa.ChunkedArray:
    """One cleaned text per row of ``fields`` (string columns named by the template)."""
    missing = [n for n in template_fields(template) if n not in fields.column_names]
    if missing:
        raise ConfigError(f"data.text_template: fields {missing} are not provided by this "
                          f"data format (available: {sorted(fields.column_names)})")
    n = fields.num_rows
    cleaned = {name: _nullify_empty(_clean(fields[name])) for name in template_fields(template)}
    segments = []
    for segment in template:
        pieces: list[pa.ChunkedArray | pa.Scalar] = []
        for literal, name, _, _ in string.Formatter().parse(segment):
            if literal:
                pieces.append(pa.scalar(literal))
            if name is not None:
                pieces.append(cleaned[name])
        if not any(isinstance(p, pa.ChunkedArray) for p in pieces):
            pieces.append(pa.chunked_array([pa.array([""] * n, pa.string())]))
        segments.append(pc.binary_join_element_wise(*pieces, ""))
    # pyarrow's join with null_handling="skip" drops (!) rows whose values are all null,
    # so such rows get an empty first segment instead.
    all_null = segments[0].is_null()
    for segment in segments[1:]:
        all_null = pc.and_(all_null, segment.is_null())
    segments[0] = pc.if_else(all_null, pa.scalar("", pa.string()), segments[0])
    text = (segments[0] if len(segments) == 1 else
            pc.binary_join_element_wise(*segments, separator, null_handling="skip"))
    text = pc.fill_null(text, "")
    if max_chars > 0:
        text = pc.utf8_slice_codeunits(text, 0, max_chars)
        text = pc.utf8_rtrim_whitespace(text)
    return text


def _clean(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Unescapes HTML entities and collapses whitespace runs to one space."""
    column = pc.cast(column, pa.string())
    rows = pc.indices_nonzero(pc.fill_null(pc.match_substring(column, "&"), False))
    if len(rows):
        values = column.to_numpy(zero_copy_only=False)
        values[rows.to_numpy()] = [html.unescape(v) for v in pc.take(column, rows).to_pylist()]
        column = pa.chunked_array([pa.array(values, pa.string())])
    column = pc.replace_substring_regex(column, r"\s+", " ")
    return pc.utf8_trim_whitespace(column)


def _nullify_empty(column: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)
