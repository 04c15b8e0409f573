"""The package's layering: no import cycle inside ``diffusion/`` (deferred imports inside
functions included), and the lower layers never import the ones above them."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "diffusion")


def _modules():
    mods = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(ROOT))[:-3]
                name = rel.replace(os.sep, ".")
                mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = (
                    os.path.join(dirpath, f)
                )
    return mods


def _graph():
    """{module: set of diffusion modules it imports anywhere in its body}."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module not in mods:
                    continue
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in mods else node.module)
        deps.discard(name)
        # importing a submodule first runs its package's __init__, which is not a real edge
        # unless the package imports the module back (then the __init__ edges show the cycle)
        graph[name] = deps - {"diffusion"}
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if state.get(m) is None:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if state.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def test_the_import_graph_has_the_modules_and_edges_we_expect():
    g = _graph()  # the checker itself must see real edges, or the tests below prove nothing
    assert "diffusion.training.loop" in g
    assert "diffusion.factories" in g["diffusion.training.loop"]
    assert "diffusion.evaluation.settings" in g["diffusion.config_check"]  # a deferred import
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_inside_the_package():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# A module may import only from its own layer or the ones below it.
LAYERS = [
    # 0: foundations
    {
        "diffusion.schedules",
        "diffusion.io",
        "diffusion.rng",
        "diffusion.progress",
        "diffusion.quiet_logs",
        "diffusion.cpu_runtime",
        "diffusion.parallel",
    },
    # 1: the maths
    {
        "diffusion.gaussian",
        "diffusion.losses",
        "diffusion.likelihood",
        "diffusion.sampling",
        "diffusion.parameterization",
        "diffusion.samplers",
        "diffusion.samplers.base",
        "diffusion.samplers.config",
        "diffusion.samplers.grids",
        "diffusion.samplers.denoiser",
        "diffusion.training.t_sampler",
        "diffusion.samplers.ancestral",
        "diffusion.samplers.ddim",
        "diffusion.samplers.dpm_solver",
        "diffusion.samplers.heun",
    },
    # 2: components: models, data, metrics, checkpoints
    {
        "diffusion.models",
        "diffusion.models.registry",
        "diffusion.models.conv",
        "diffusion.models.winograd_ffi",
        "diffusion.models.cpu_kernels",
        "diffusion.models.group_norm",
        "diffusion.models.layers",
        "diffusion.models.unet",
        "diffusion.data",
        "diffusion.data.builders",
        "diffusion.data.pipeline",
        "diffusion.metrics",
        "diffusion.metrics.fid",
        "diffusion.metrics.inception",
        "diffusion.metrics.inception.network",
        "diffusion.metrics.inception.weights",
        "diffusion.metrics.inception.features",
        "diffusion.metrics.torchscript_reader",
        "diffusion.checkpoint",
        "diffusion.evaluation.settings",
    },
    # 3: what a run is built from, and its validation
    {"diffusion.factories", "diffusion.config_check"},
    # 4: evaluation and training pieces
    {
        "diffusion.training.step",
        "diffusion.training.restore",
        "diffusion.training.hooks",
        "diffusion.evaluation",
        "diffusion.evaluation.results",
        "diffusion.evaluation.generator",
        "diffusion.evaluation.references",
        "diffusion.evaluation.step_data",
        "diffusion.evaluation.floor",
        "diffusion.evaluation.evaluators",
    },
    # 5: the drivers and tools
    {
        "diffusion.training",
        "diffusion.training.loop",
        "diffusion.evaluate",
        "diffusion.convert",
        "diffusion.convert.common",
        "diffusion.convert.tf",
        "diffusion.convert.diffusers",
        "diffusion.convert.workdir",
        "diffusion.convert.cli",
        "diffusion.convert.__main__",
    },
]


def test_every_module_has_a_layer_and_imports_only_downwards():
    g = _graph()
    layer = {m: i for i, mods in enumerate(LAYERS) for m in mods}
    missing = sorted(set(g) - set(layer) - {"diffusion"})
    assert not missing, f"modules without a layer in tests/test_layers.py: {missing}"
    bad = [
        f"{m} (layer {layer[m]}) imports {d} (layer {layer[d]})"
        for m, deps in g.items()
        if m in layer
        for d in deps
        if layer.get(d, -1) > layer[m]
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "module", ["diffusion.factories", "diffusion.evaluation.evaluators", "diffusion.samplers"]
)
def test_lower_layers_do_not_reach_up_to_the_drivers(module):
    g = _graph()
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(g.get(m, ()))
    assert not seen & {"diffusion.training", "diffusion.training.loop", "diffusion.evaluate"}, seen
