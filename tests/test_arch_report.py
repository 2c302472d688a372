"""tools/arch_report.py on a made-up package: the circle, the lazy import, the private name
imported across modules, the import against the layer order and the long function are all
found; and the package itself has none of them."""

import arch_report


def test_report_finds_circles_private_imports_and_long_functions(tmp_path):
    pkg = tmp_path / "diffgrm_dist"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from diffgrm_dist.b import thing\n\ndef f():\n    from diffgrm_dist import c\n")
    (pkg / "b.py").write_text("from diffgrm_dist.sub.d import _hidden\nthing = 1\n")
    (pkg / "c.py").write_text("from diffgrm_dist.a import f\n")
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    (pkg / "sub" / "d.py").write_text(f"_hidden = 0\n\ndef long():\n{body}\n")
    r = arch_report.report(pkg, layers=("sub", "b", "a", "c"))
    assert r["imports"]["a"] == {"b": "top", "c": "lazy"}
    assert r["imports"]["b"] == {"sub.d": "top"}
    assert r["cycles"] == [["a", "c"]]
    assert r["layer_cycles"] == [["a", "c"]]
    assert r["upward_imports"] == ["a -> c"]  # c sits above a; b -> sub.d and c -> a go downward
    assert r["private_imports"] == {"b": ["sub.d._hidden"]}
    assert r["longest_functions"][0] == ("sub.d.long", 71)
    assert r["functions_over_60_lines"] == 1
    assert {m["name"]: m["lines"] for m in r["modules"]}["sub.d"] == 73


def test_the_package_has_no_circle_no_upward_import_and_no_private_import():
    r = arch_report.report(arch_report.ROOT / arch_report.PACKAGE)
    assert r["cycles"] == [] and r["layer_cycles"] == []
    assert r["upward_imports"] == []
    assert r["private_imports"] == {}
