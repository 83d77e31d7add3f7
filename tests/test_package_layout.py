"""The package's import graph, read with ``ast`` from the source: no cycles, no import from a lower
layer to a higher one, and no module over 600 lines.

Layers, bottom to top (a module may import its own folder and the folders below it):
``compat`` < ``distributed`` < ``modules`` < ``checkpoints`` < ``models``, ``criterions`` <
``fairseq_hooks`` < ``cli`` < ``launch`` and the package's ``__init__``. Imports inside functions count.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fairseq_stablemoe"
LAYERS = {
    "compat": 0,
    "distributed": 1,
    "modules": 2,
    "checkpoints": 3,
    "models": 4,
    "criterions": 4,
    "fairseq_hooks": 5,
    "cli": 6,
    "launch": 7,
    "__init__": 8,
}
#: a registered component imports layers, never another registered component's folder
SIDEWAYS_FORBIDDEN = {("criterions", "models"), ("models", "criterions")}


def module_name(path: Path) -> str:
    parts = ["fairseq_stablemoe", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: Set[str]) -> Set[str]:
    """The package modules ``path`` imports (anywhere in it), resolved to module names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t in known and t != name:
                found.add(t)
    return found


def graph() -> Dict[str, Set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, known) for p in paths}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_graph_sees_the_imports():
    """The reader resolves relative, absolute, lazy and ``from . import x`` forms (else the tests below pass
    vacuously)."""
    g = graph()
    assert "fairseq_stablemoe.modules.moe_layer" in g["fairseq_stablemoe.modules.stablemoe_layer"]
    assert "fairseq_stablemoe.distributed.expert_parallel" in g["fairseq_stablemoe.modules.moe_layer"]
    assert "fairseq_stablemoe.models.stablemoe_lm" in g["fairseq_stablemoe.models"]
    assert "fairseq_stablemoe.fairseq_hooks.eval_tools" in g["fairseq_stablemoe.cli.train"]  # inside cli_main
    assert sum(len(v) for v in g.values()) > 60


def test_no_import_cycles():
    g = graph()
    state: Dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: List[str]) -> None:
        state[m] = 1
        for n in sorted(g[m]):
            if n in stack and state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_import_runs_back_up_the_layers():
    bad = []
    for m, deps in graph().items():
        for d in deps:
            if d == "fairseq_stablemoe" or layer(d) == layer(m):
                continue
            if LAYERS[layer(d)] > LAYERS[layer(m)] or (layer(m), layer(d)) in SIDEWAYS_FORBIDDEN:
                bad.append(f"{m} ({layer(m)}) imports {d} ({layer(d)})")
    assert not bad, "\n".join(bad)


def test_every_folder_is_a_known_layer():
    assert {layer(m) for m in graph()} <= set(LAYERS)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_600_lines(path):
    assert len(path.read_text().splitlines()) <= 600


def test_layer_constructors_take_their_defaults_from_the_options():
    """Every constructor parameter named after an MoE option defaults to the option's default (the dataclass
    is the one place a default is written: a literal beside it would drift when it changes)."""
    import inspect

    from fairseq_stablemoe.modules.health import CollapseMonitor
    from fairseq_stablemoe.modules.moe_layer import MoELayer
    from fairseq_stablemoe.modules.moe_types import MOE_LAYERS
    from fairseq_stablemoe.modules.options import MoEOptions, option_default

    options = {f for f in MoEOptions.__dataclass_fields__}
    aliases = {"share": "collapse_share", "patience": "collapse_updates", "routing_counts": "no_routing_counts"}
    checked = 0
    for cls in [MoELayer, CollapseMonitor, *MOE_LAYERS.values()]:
        for name, param in inspect.signature(cls.__init__).parameters.items():
            option = aliases.get(name, name)
            if option not in options or param.default is inspect.Parameter.empty:
                continue
            want = option_default(option)
            if name == "routing_counts":
                want = not want
            assert param.default == want, f"{cls.__name__}({name}={param.default!r}): --{option} defaults to {want!r}"
            checked += 1
    assert checked >= 12
