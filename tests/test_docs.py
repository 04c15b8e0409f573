"""docs/design.md cannot drift from the code: its import table and its layer table are compared
with the import graph and `LAYERS` as they are when the test runs. Fix a failure by running
``python tests/design_table.py --write`` (both tables' module lists; a new layer's row and every
module's role are written by hand)."""

import design_table as dt
from test_layers import LAYERS


def test_the_design_import_table_is_the_real_import_graph():
    actual = dt.import_graph()
    documented = dt.parse(dt.DESIGN_MD.read_text(encoding="utf-8"))
    wrong = dt.differences(documented, actual)
    assert not wrong, (
        "docs/design.md 'Who imports whom' differs from the code; rows to change:\n  "
        + "\n  ".join(wrong)
        + "\nregenerate it with: python tests/design_table.py --write"
    )


def test_the_design_layer_table_is_layers():
    documented = dt.layer_rows(dt.DESIGN_MD.read_text(encoding="utf-8"))
    actual = {i: frozenset(dt.short(m) for m in mods) for i, mods in enumerate(LAYERS)}
    wrong = [
        f"layer {i}: add {sorted(actual.get(i, set()) - documented.get(i, set()))}, "
        f"remove {sorted(documented.get(i, set()) - actual.get(i, set()))}"
        for i in sorted(set(actual) | set(documented))
        if actual.get(i) != documented.get(i)
    ]
    assert not wrong, (
        "docs/design.md '## Layers' table differs from LAYERS in tests/test_layers.py:\n  "
        + "\n  ".join(wrong)
        + "\nregenerate it with: python tests/design_table.py --write"
    )


def test_the_checker_sees_a_missing_edge_a_stale_row_and_a_new_module():
    # The comparison must fail on each kind of drift, or the tests above prove nothing.
    graph = {
        "a": (frozenset(), frozenset()),
        "b": (frozenset({"a"}), frozenset()),
        "c": (frozenset({"b"}), frozenset({"a"})),
    }
    documented = dt.parse(dt.HEADING + "\n\n" + dt.table(graph))
    assert documented == graph  # the printed table reads back as the graph it came from
    stale = dict(documented, gone=(frozenset(), frozenset()))
    stale["c"] = (frozenset({"b"}), frozenset())
    del stale["b"]
    assert dt.differences(stale, graph) == [
        "`b`: missing; add | `b` | a | — |",
        "`c` (deferred): add a",
        "`gone`: not a module any more; delete it from the table",
    ]


def test_the_graph_sees_deferred_and_module_level_imports(tmp_path):
    pkg = tmp_path / "diffusion"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("")
    (pkg / "sub" / "leaf.py").write_text("")
    (pkg / "high.py").write_text(
        "from diffusion import low\n"
        "def f():\n    from diffusion.sub import leaf\n    import diffusion.low\n"
    )
    (tmp_path / "launch.py").write_text("def main():\n    from diffusion import high\n")
    graph = dt.import_graph(tmp_path)
    assert graph["high"] == (frozenset({"low"}), frozenset({"sub.leaf"}))
    assert graph["launch"] == (frozenset(), frozenset({"high"}))
    assert graph["sub"] == graph["low"] == (frozenset(), frozenset())


def test_write_sets_the_layer_rows_from_layers_and_keeps_their_order_and_roles():
    text = (
        "## Layers\n\n| layer | modules | role |\n|---|---|---|\n"
        "| 1: up | `b`, `a`, `gone` | role one |\n| 0: base | `io` | role zero |\n\nafter\n"
    )
    layers = [{"diffusion.io"}, {"diffusion.a", "diffusion.b", "diffusion.c"}, {"diffusion.x"}]
    out, missing = dt.with_layers(text, layers)
    assert "| 1: up | `b`, `a`, `c` | role one |\n" in out
    assert dt.layer_rows(out) == {1: {"a", "b", "c"}, 0: {"io"}}
    assert out.endswith("| 0: base | `io` | role zero |\n\nafter\n")
    assert missing == [2]  # a layer without a row is reported, not invented
