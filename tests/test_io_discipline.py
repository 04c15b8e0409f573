"""Static check: every file a module of ``diffusion/`` touches goes through `diffusion.io`.

A workdir may be ``gs://bucket/run`` (a TPU pod's), where ``open``, ``os.makedirs``,
``os.path.exists`` or ``shutil`` quietly act on a local folder named ``gs:`` instead. This test
parses every module under ``diffusion/`` (except ``diffusion/io.py``, which implements the local
side) with `ast` and fails on a call of the builtin ``open`` (or ``io.open`` / ``builtins.open``
of the standard library), ``shutil.*``, ``os.path.exists``, or ``os`` functions that create,
delete, rename or list files (``makedirs``, ``mkdir``, ``remove``, ``unlink``, ``rename``,
``replace``, ``listdir``), however imported (``from os import makedirs``, ``import shutil as
sh``), unless the enclosing (module, function) is in `ALLOWED`, which names the few places that
touch local files that are never a workdir, each with its reason. Method calls such as
``zipfile.ZipFile.open``, ``gzip.open`` or ``Image.open`` are not flagged (they read what they
are given, an open file object or a path the caller chose).
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "diffusion")

#: ``os`` functions that act on the file system (``os.path.exists`` is handled apart).
OS_FILE_FUNCTIONS = {"makedirs", "mkdir", "remove", "unlink", "rename", "replace", "listdir"}

#: (module path relative to the repository, enclosing function) -> why it may touch local files.
ALLOWED: Dict[Tuple[str, str], str] = {
    (
        "diffusion/metrics/inception/weights.py",
        "load_inception_params",
    ): "hashes the shipped/pip-installed Inception weight file, a local package file",
    (
        "diffusion/metrics/torchscript_reader.py",
        "read_torch_state_dict",
    ): "reads a local torch.save file the caller chose (the TorchScript weight reader)",
    (
        "diffusion/models/cpu_kernels.py",
        "_library_key",
    ): "reads /proc/cpuinfo to key the C++ kernel build cache",
    (
        "diffusion/models/cpu_kernels.py",
        "_build",
    ): "finds the C++ compiler (shutil.which) and renames the built .so into the local cache",
    (
        "diffusion/models/cpu_kernels.py",
        "_compiler",
    ): "finds the C++ compiler on PATH (shutil.which), no file of a workdir",
    (
        "diffusion/models/cpu_kernels.py",
        "_write_atomic",
    ): "renames a built .so or a build-failure marker into the local kernel cache",
    (
        "diffusion/data/builders.py",
        "_file_lock",
    ): "an fcntl lock file beside a local TFDS data_dir (skipped for gs:// data dirs)",
}


def _aliases(tree: ast.Module) -> Dict[str, str]:
    """``{local name: dotted stdlib name}`` for the imports of ``os``, ``os.path``, ``shutil``,
    ``io``, ``builtins`` and their forbidden functions in ``tree`` (any scope)."""
    out: Dict[str, str] = {}
    watched = {"os", "os.path", "shutil", "io", "builtins"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in watched and a.asname:  # `import os.path as osp`
                    out[a.asname] = a.name
                elif a.name in watched:  # `import os.path` binds `os`
                    out[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in watched:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.ImportFrom):  # e.g. `from diffusion import io`: not stdlib
            for a in node.names:
                out.pop(a.asname or a.name, None)
    return out


def _dotted(node: ast.AST, aliases: Dict[str, str]) -> Optional[str]:
    """The stdlib dotted name a call target resolves to through ``aliases`` (None if unknown)."""
    parts: List[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    if node.id in aliases:
        head = aliases[node.id]
    elif node.id == "open" and not parts:
        head = "builtins.open"
    else:
        return None
    return ".".join([head] + parts[::-1])


def _forbidden(name: str) -> bool:
    if name in ("builtins.open", "io.open", "os.path.exists"):
        return True
    if name.startswith("shutil."):
        return True
    mod, _, fn = name.rpartition(".")
    return mod == "os" and fn in OS_FILE_FUNCTIONS


class _Finder(ast.NodeVisitor):
    def __init__(self, aliases: Dict[str, str]):
        self.aliases = aliases
        self.stack: List[str] = []
        self.hits: List[Tuple[str, int, str]] = []  # (function, line, call)

    def _scope(self, node):
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _scope

    def visit_Call(self, node: ast.Call):
        name = _dotted(node.func, self.aliases)
        if name is not None and _forbidden(name):
            fn = self.stack[-1] if self.stack else "<module>"
            self.hits.append((fn, node.lineno, name))
        self.generic_visit(node)


def find_local_file_calls(source: str) -> List[Tuple[str, int, str]]:
    """``[(enclosing function, line, resolved call)]`` of the forbidden calls in ``source``
    (module text); the function is the innermost ``def`` (``'<module>'`` at top level)."""
    tree = ast.parse(source)
    f = _Finder(_aliases(tree))
    f.visit(tree)
    return f.hits


def _modules() -> List[str]:
    out = []
    for d, _, files in os.walk(PACKAGE):
        out += [os.path.join(d, n) for n in files if n.endswith(".py")]
    return sorted(out)


def test_checker_sees_the_spellings():
    """The checker resolves aliases and ignores method calls and `diffusion.io`."""
    src = (
        "import os, shutil as sh\n"
        "from os import makedirs\n"
        "from os.path import exists as ex\n"
        "import io as stdio\n"
        "def f(p):\n"
        "    open(p); sh.rmtree(p); makedirs(p); ex(p); stdio.open(p); os.path.exists(p)\n"
        "    os.listdir(p)\n"
        "def g(p, zf):\n"
        "    zf.open(p); os.path.join(p, 'x'); os.path.isfile(p)\n"
    )
    assert [(fn, c) for fn, _, c in find_local_file_calls(src)] == [
        ("f", "builtins.open"),
        ("f", "shutil.rmtree"),
        ("f", "os.makedirs"),
        ("f", "os.path.exists"),
        ("f", "io.open"),
        ("f", "os.path.exists"),
        ("f", "os.listdir"),
    ]
    assert find_local_file_calls("from diffusion import io\ndef h(p):\n    io.open(p)\n") == []


def test_no_local_file_calls_on_workdir_paths():
    """No module under diffusion/ but io.py calls open / os.makedirs / shutil / os.path.exists
    (and kin) outside the allow-listed local-only places."""
    bad, used = [], set()
    for path in _modules():
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        if rel == "diffusion/io.py":
            continue
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for fn, line, call in find_local_file_calls(source):
            if (rel, fn) in ALLOWED:
                used.add((rel, fn))
                continue
            bad.append(f"{rel}:{line} in {fn}(): {call}")
    assert not bad, (
        "local file calls outside diffusion/io.py (use diffusion.io so gs:// workdirs work, or "
        "allow-list the place in tests/test_io_discipline.py with the reason):\n  "
        + "\n  ".join(bad)
    )
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"allow-list entries that no longer match a call: {stale}"
