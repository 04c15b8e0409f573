"""docs/performance.md cannot drift from the code: its knob table lists exactly the environment
variables the code reads (diffusion/, launch.py, experiments/, benchmarks/), the fields of
``config.runtime``, and the tuning constants of the CPU modules; found by parsing the code (ast),
not by a list kept here."""

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
CODE = [ROOT / "diffusion", ROOT / "launch.py", ROOT / "experiments", ROOT / "benchmarks"]
#: Modules whose module-level numbers (and ``*_FLAGS`` / ``*_PLAN`` values) are tuning constants.
KNOB_MODULES = [
    ROOT / "diffusion" / "cpu_runtime.py",
    ROOT / "diffusion" / "models" / "conv.py",
    ROOT / "diffusion" / "models" / "cpu_kernels.py",
    ROOT / "diffusion" / "models" / "unet.py",
    ROOT / "diffusion" / "models" / "group_norm.py",
    ROOT / "diffusion" / "models" / "winograd_ffi.py",
]
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")


def _files():
    for p in CODE:
        yield from ([p] if p.is_file() else sorted(p.rglob("*.py")))


def _module_strings(tree):
    """Module-level ``NAME = 'string'`` assignments (e.g. ``ENV_VAR = 'DDPM_FID_WEIGHTS'``)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for t in node.targets:
                if isinstance(t, ast.Name) and isinstance(node.value.value, str):
                    out[t.id] = node.value.value
    return out


def _is_environ(node) -> bool:
    """``os.environ``, ``environ``, ``env`` (the readers' names for the environment mapping)."""
    if isinstance(node, ast.Attribute):
        return node.attr == "environ"
    return isinstance(node, ast.Name) and node.id in ("environ", "env")


def _name_of(arg, consts, imported):
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.Name):
        return consts.get(arg.id)
    if isinstance(arg, ast.Attribute):  # e.g. cpu_runtime.KEEP_FREED_MEMORY_ENV
        return imported.get(arg.attr)
    return None


def code_env_vars():
    """Every environment variable name read in the code: ``os.environ.get/[]/setdefault``,
    ``os.getenv``, ``cpu_runtime.getenv`` and ``env.get`` on the environment mapping, with
    names given as literals or module constants; plus the old names of `RENAMED_ENV`."""
    trees = {p: ast.parse(p.read_text(), str(p)) for p in _files()}
    imported = {}
    for tree in trees.values():
        imported.update(_module_strings(tree))
    found = {}
    for path, tree in trees.items():
        consts = _module_strings(tree)
        for node in ast.walk(tree):
            arg = None
            if isinstance(node, ast.Call) and node.args:
                f = node.func
                if isinstance(f, ast.Attribute) and f.attr in ("get", "setdefault", "pop"):
                    if _is_environ(f.value):
                        arg = node.args[0]
                elif (isinstance(f, ast.Attribute) and f.attr == "getenv") or (
                    isinstance(f, ast.Name) and f.id == "getenv"
                ):
                    arg = node.args[0]
            elif isinstance(node, ast.Subscript) and _is_environ(node.value):
                arg = node.slice
            name = _name_of(arg, consts, imported) if arg is not None else None
            if name and ENV_NAME.match(name):
                found.setdefault(name, str(path.relative_to(ROOT)))
    from diffusion import cpu_runtime

    for old in cpu_runtime.RENAMED_ENV:
        found.pop(old, None)  # documented in the renames table, not as knobs of their own
    return found


def knob_constants():
    """Module-level single-name assignments in `KNOB_MODULES` of a number, or named
    ``*_FLAGS`` / ``*_PLAN``."""
    out = {}
    for path in KNOB_MODULES:
        for node in ast.parse(path.read_text()).body:
            target, value = None, None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                target, value = node.target, node.value
            if not isinstance(target, ast.Name):
                continue
            number = isinstance(value, ast.Constant) and isinstance(value.value, (int, float))
            number |= isinstance(value, ast.UnaryOp) and isinstance(value.operand, ast.Constant)
            if number or target.id.endswith(("_FLAGS", "_PLAN")):
                out[target.id] = str(path.relative_to(ROOT))
    return out


def runtime_fields():
    from experiments import default

    return {f"runtime.{k}" for k in default.get_config().runtime}


def table():
    """``{name: kind}`` from the knob table: the first backticked word of each row's first
    cell and its kind column."""
    rows = {}
    text = DOC.read_text()
    body = text[text.index("## The table") :]
    body = body[: body.index("\n## ", 5)]
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 6 or cells[0] in ("name", "---"):
            continue
        m = re.search(r"`([^`]+)`", cells[0])
        if m:
            rows[m.group(1)] = cells[1]
    return rows


def test_the_parsers_see_the_real_code():
    # The checks below prove nothing if the parsers find nothing: known reads, fields, constants.
    env = code_env_vars()
    assert {"DDPM_CPU_KERNELS", "DDPM_KEEP_FREED_MEMORY", "DDPM_CACHE_DIR", "CXX"} <= set(env)
    assert {"DDPM_COORDINATOR", "DDPM_BARRIER_TIMEOUT", "XLA_FLAGS", "DDPM_FID_WEIGHTS"} <= set(env)
    assert {"MAX_TILE_ROWS", "W2_WGRAD_MAX_TILE_ROWS", "_MIN_CHANNELS", "XLA_CPU_FLAGS"} <= set(
        knob_constants()
    )
    assert runtime_fields() == {"runtime.conv_impl", "runtime.remat", "runtime.remat_resolutions"}
    assert len(table()) >= 20


def test_every_environment_variable_the_code_reads_is_in_the_table():
    env, rows = code_env_vars(), table()
    missing = {n: where for n, where in env.items() if n not in rows}
    assert not missing, f"add these to docs/performance.md's table (read in): {missing}"
    stale = sorted(n for n, kind in rows.items() if kind == "env" and n not in env)
    assert not stale, f"the table lists variables the code no longer reads: {stale}"


def test_every_runtime_field_is_in_the_table():
    rows = table()
    documented = {n for n, kind in rows.items() if kind == "config"}
    assert documented == runtime_fields()


def test_every_tuning_constant_is_in_the_table():
    consts, rows = knob_constants(), table()
    missing = {n: where for n, where in consts.items() if n not in rows}
    assert not missing, f"add these constants to docs/performance.md's table: {missing}"
    stale = sorted(n for n, kind in rows.items() if kind == "constant" and n not in consts)
    assert not stale, f"the table lists constants the code no longer has: {stale}"


@pytest.mark.parametrize("doc", ["docs/performance.md"])
def test_the_renames_are_documented(doc):
    from diffusion import cpu_runtime

    text = (ROOT / doc).read_text()
    for old, new in cpu_runtime.RENAMED_ENV.items():
        assert re.search(rf"`{old}` \| `{new}`", text), (old, new)


def test_the_documented_default_cache_dir_is_the_code_s():
    from diffusion import cpu_runtime

    default = cpu_runtime.cache_dir({})
    assert str(default).replace(os.path.expanduser("~"), "~") in DOC.read_text()
