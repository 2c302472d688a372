import pyarrow as pa
import pytest

from diffgrm_dist.core.errors import ConfigError
from diffgrm_dist.data.text import render_text, template_fields


def test_segments_with_empty_fields_are_dropped():
    fields = pa.table({"title": ["Rose &amp; Oud\n Perfume", "Soap", ""],
                       "brand": ["Acme", None, ""], "price": ["9.5", "", "3"]})
    text = render_text(fields, ["Title: {title}", "Brand: {brand}", "Price: ${price}"], "; ", 0)
    assert text.to_pylist() == ["Title: Rose & Oud Perfume; Brand: Acme; Price: $9.5",
                                "Title: Soap", "Price: $3"]


def test_single_segment_keeps_rows_and_truncates():
    fields = pa.table({"title": ["a  b", "", "c" * 50]})
    assert render_text(fields, ["{title}"], " ", 10).to_pylist() == ["a b", "", "c" * 10]


def test_template_field_checks():
    assert template_fields(["T: {title} {brand}", "{title}"]) == ["title", "brand"]
    with pytest.raises(ConfigError, match="plain"):
        template_fields(["{title!r}"])
    with pytest.raises(ConfigError, match="not provided"):
        render_text(pa.table({"title": ["x"]}), ["{genres}"], " ", 0)


def test_rows_with_every_field_empty_are_kept_in_place():
    fields = pa.table({"a": ["x", None, "", "y"], "b": [None, None, "z", "w"]})
    assert render_text(fields, ["{a}", "{b}"], "; ", 0).to_pylist() == ["x", "", "z", "y; w"]
