"""The "Who imports whom" table of docs/design.md, computed from the code.

`python tests/design_table.py` prints the table; `python tests/design_table.py --write` puts it
into docs/design.md in place of the old one, and sets the module lists of the doc's "Layers" table
from `LAYERS` in tests/test_layers.py. `tests/test_docs.py` fails, naming the rows to
change, when the table in the doc and the code disagree.

The graph: every ``import`` / ``from ... import`` of a module of this repository, found with
``ast`` in ``diffusion/**/*.py``, ``launch.py`` and ``experiments/*.py``. An import inside a
function body is "deferred"; a deferred import of a module that is also imported at module level
is not listed again. Imports made by ``importlib.import_module`` with a computed name (the
built-in samplers, ``convert``'s config lookup) are not seen.
"""

from __future__ import annotations

import ast
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
DESIGN_MD = REPO / "docs" / "design.md"
HEADING = "## Who imports whom (computed)"
COLUMNS = ("module", "imports at module level", "deferred imports")
NONE = "—"
ROOTS = ("diffusion", "experiments")  # package roots: importing one is not an edge


def module_files(repo: pathlib.Path = REPO) -> dict[str, pathlib.Path]:
    """{dotted module name: file} for diffusion/, launch.py and experiments/ (a package is its
    ``__init__.py``)."""
    files = [*sorted((repo / "diffusion").rglob("*.py")), repo / "launch.py"]
    files += sorted((repo / "experiments").glob("*.py"))
    mods = {}
    for p in files:
        if not p.exists():
            continue
        parts = list(p.relative_to(repo).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(tree: ast.AST) -> list[tuple[ast.AST, bool]]:
    """(import node, deferred?) for every import in the tree; deferred = inside a function."""
    out = []

    def walk(node, deferred):
        for child in ast.iter_child_nodes(node):
            d = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append((child, d))
            walk(child, d)

    walk(tree, False)
    return out


def _targets(node, module: str, is_package: bool, mods) -> set[str]:
    """The repository modules one import node names (``from a import b`` is ``a.b`` when that is
    a module, else ``a``)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in mods}
    if node.level:  # relative: resolve against this module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out = set()
    for a in node.names:
        sub = f"{source}.{a.name}"
        if sub in mods:
            out.add(sub)
        elif source in mods:
            out.add(source)
    return out


def import_graph(repo: pathlib.Path = REPO) -> dict[str, tuple[frozenset, frozenset]]:
    """{module: (module-level imports, deferred-only imports)}, names as in the doc (without the
    ``diffusion.`` prefix)."""
    mods = module_files(repo)
    graph = {}
    for name, path in mods.items():
        if name in ROOTS:
            continue
        top, lazy = set(), set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, deferred in _imports(tree):
            deps = _targets(node, name, path.name == "__init__.py", mods)
            (lazy if deferred else top).update(deps - {name, *ROOTS})
        graph[short(name)] = (
            frozenset(short(m) for m in top),
            frozenset(short(m) for m in lazy - top),
        )
    return graph


def short(module: str) -> str:
    """``diffusion.models.unet`` -> ``models.unet``; other names stay as they are."""
    return module[len("diffusion.") :] if module.startswith("diffusion.") else module


def _depth(graph) -> dict[str, int]:
    """Longest chain of module-level + deferred imports below each module (0: imports none)."""
    memo: dict[str, int] = {}

    def depth(m, seen=()):
        if m not in memo:
            deps = [d for d in graph[m][0] | graph[m][1] if d in graph and d not in seen]
            memo[m] = 1 + max((depth(d, (*seen, m)) for d in deps), default=-1)
        return memo[m]

    for m in graph:
        depth(m)
    return memo


def _cell(names) -> str:
    return ", ".join(sorted(names)) or NONE


def table(graph=None) -> str:
    """The markdown table: one row per set of modules with identical imports; the package first,
    then the entry points and configs, each bottom-up (a row's modules import only modules of the
    rows above it, cycles aside)."""
    graph = import_graph() if graph is None else graph
    depth = _depth(graph)
    groups: dict[tuple, list[str]] = {}

    def order(m):
        outside = m == "launch" or m.startswith("experiments.")
        return (outside, depth[m], m)

    for m in sorted(graph, key=order):
        groups.setdefault((*order(m)[:2], graph[m][0], graph[m][1]), []).append(m)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|"]
    for (_, _, top, lazy), members in groups.items():
        first = ", ".join(f"`{m}`" for m in members)
        lines.append(f"| {first} | {_cell(top)} | {_cell(lazy)} |")
    return "\n".join(lines) + "\n"


def _table_span(text: str) -> tuple[int, int]:
    """Character range [start, end) of the table under HEADING in the doc."""
    at = text.find(HEADING)
    if at < 0:
        raise ValueError(f"{DESIGN_MD.name}: no heading {HEADING!r}; put it back above the table")
    start = text.find("\n| ", at)
    if start < 0:
        raise ValueError(f"{DESIGN_MD.name}: no table under {HEADING!r}")
    start += 1
    end = start
    for line in text[start:].splitlines(keepends=True):
        if not line.startswith("|"):
            break
        end += len(line)
    return start, end


def _names(cell: str) -> frozenset:
    cell = cell.strip().replace("`", "")
    if cell in ("", NONE, "-"):
        return frozenset()
    return frozenset(n.strip() for n in cell.split(",") if n.strip())


def parse(text: str) -> dict[str, tuple[frozenset, frozenset]]:
    """The table under HEADING in a design.md text, as {module: (module-level, deferred)}."""
    start, end = _table_span(text)
    rows = text[start:end].splitlines()
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    if tuple(header) != COLUMNS:
        raise ValueError(f"{DESIGN_MD.name}: table columns {header}, expected {list(COLUMNS)}")
    out = {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) != 3:
            raise ValueError(f"{DESIGN_MD.name}: a row without 3 cells: {row}")
        for m in _names(cells[0]):
            out[m] = (_names(cells[1]), _names(cells[2]))
    return out


def differences(documented, actual) -> list[str]:
    """One line per module whose documented row differs from the code, naming the change."""
    out = []
    for m in sorted(set(documented) | set(actual)):
        if m not in actual:
            out.append(f"`{m}`: not a module any more; delete it from the table")
        elif m not in documented:
            top, lazy = actual[m]
            out.append(f"`{m}`: missing; add | `{m}` | {_cell(top)} | {_cell(lazy)} |")
        elif documented[m] != actual[m]:
            for kind, doc, real in zip(("module level", "deferred"), documented[m], actual[m]):
                if doc != real:
                    add = f" add {_cell(real - doc)}" if real - doc else ""
                    drop = f" remove {_cell(doc - real)}" if doc - real else ""
                    out.append(f"`{m}` ({kind}):{add}{drop}")
    return out


def layer_rows(text: str) -> dict[int, frozenset]:
    """The "## Layers" table of a design.md text as {layer index: modules}; the first cell starts
    with the index (``5: drivers and tools``), the second lists the modules."""
    at = text.find("## Layers")
    if at < 0:
        raise ValueError(f"{DESIGN_MD.name}: no '## Layers' section")
    start = text.find("\n| ", at) + 1
    out = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        index = int(cells[0].split(":")[0])
        names = cells[1].replace("(package)", "")
        out[index] = _names(names)
    return out


def with_layers(text: str, layers) -> tuple[str, list[int]]:
    """``text`` with the modules cell of each "## Layers" row set from ``layers`` (the `LAYERS`
    list of tests/test_layers.py): documented modules keep their order, new ones are appended,
    gone ones dropped; a package is marked "(package)". Also returns the layer indices that have
    no row (a row, with its role, must be written by hand)."""
    files = module_files()
    at = text.find("## Layers")
    if at < 0:
        raise ValueError(f"{DESIGN_MD.name}: no '## Layers' section")
    start = text.find("\n| ", at) + 1
    lines = text[start:].splitlines(keepends=True)
    seen = set()
    for k, line in enumerate(lines):
        if k < 2:
            continue
        if not line.startswith("|"):
            break
        cells = line.rstrip("\n").strip().strip("|").split("|")
        index = int(cells[0].split(":")[0])
        if index >= len(layers):
            continue
        seen.add(index)
        want = {short(m) for m in layers[index]}
        old = [n.strip() for n in cells[1].replace("`", "").replace("(package)", "").split(",")]
        names = [n for n in old if n in want] + sorted(want - set(old))

        def shown(n):
            path = files.get("diffusion." + n)
            return f"`{n}`" + (" (package)" if path and path.name == "__init__.py" else "")

        cells[1] = " " + ", ".join(shown(n) for n in names) + " "
        lines[k] = "|" + "|".join(cells) + "|\n"
    missing = [i for i in range(len(layers)) if i not in seen]
    return text[:start] + "".join(lines), missing


def write(path: pathlib.Path = DESIGN_MD) -> list[int]:
    """Replaces the import table in the doc with the computed one and the layer table's module
    lists with `LAYERS`; returns the layer indices that have no row in the doc."""
    from test_layers import LAYERS

    text = path.read_text(encoding="utf-8")
    start, end = _table_span(text)
    text, missing = with_layers(text[:start] + table() + text[end:], LAYERS)
    path.write_text(text, encoding="utf-8")
    return missing


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        missing = write()
        print(f"wrote the import table and the layer table's modules into {DESIGN_MD.name}")
        if missing:
            sys.exit(f"layers {missing} of LAYERS have no row in '## Layers': add them by hand")
    elif sys.argv[1:]:
        sys.exit("usage: python tests/design_table.py [--write]")
    else:
        print(table(), end="")
