"""The package's shape: imports only point down the layers, and no modules import each other in a circle.

The layers, bottom to top (ministacks/__init__.py draws the tree). A module may import from its own
layer and from the layers below it, never from one above: the mechanisms (lm, adapters, stacks,
training, routing, inference, evaluation) never import the presets, the run folder, the stages or the
command line. Imports are read with `ast` from every statement in the file, function-local imports and
`if TYPE_CHECKING:` blocks included, so neither can hide an upward import or a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ministacks"

LAYERS = (
    ("ministacks.io", "ministacks.checkpoint", "ministacks.runtime"),  # files, checkpoints, the process
    ("ministacks.data",),  # the five domain corpora, user data, mixed prompts
    ("ministacks.lm",),  # the base model: transformer, tokenizer, NF4, pretraining
    ("ministacks.adapters",),  # LoRA and MoE-LoRA
    ("ministacks.stacks",),  # the stacked layer and stacks on disk
    ("ministacks.training",),  # the stack-training round, boosting, null-space, the continual loop
    ("ministacks.routing",),  # the oracle and the meta-router
    ("ministacks.inference",),  # a model with stacks and a router, answering prompts
    ("ministacks.evaluation",),  # task checks, HumanEval, the sandbox
    ("ministacks.rl",),  # DPO, GRPO and REINFORCE on a domain's last stack, rewards from the checks
    ("ministacks.psn",),  # PSN v2's capability blocks beside a frozen base
    ("ministacks.report",),  # report.md, the figures, the paper's numbers
    ("ministacks.presets",),  # Preset and the smoke / quick / paper values
    ("ministacks.run",),  # a run folder that describes itself
    ("ministacks.stages",),  # the work of each command
    ("ministacks.bench",),  # speed measurements
    ("ministacks.__main__", "ministacks"),  # the command line, the package itself
)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(module: str, is_package: bool, source: str, known: set[str]) -> set[str]:
    """The package's modules that `source` imports, from every import statement anywhere in the file."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != module}
    return found


def import_graph(sources: dict[str, tuple[bool, str]]) -> dict[str, set[str]]:
    """{module: (is_package, source)} -> {module: modules of the package it imports}."""
    known = set(sources)
    return {m: imports_of(m, pkg, src, known) for m, (pkg, src) in sources.items()}


def package_sources() -> dict[str, tuple[bool, str]]:
    return {module_name(p, PACKAGE): (p.name == "__init__.py", p.read_text()) for p in PACKAGE.rglob("*.py")}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
                  for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other around a loop (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_point_down_and_never_round_a_loop():
    graph = import_graph(package_sources())
    assert len(graph) > 40  # the walk found the package
    assert upward_imports(graph) == []
    assert circles(graph) == []


def test_an_upward_import_is_caught_even_inside_a_function():
    sources = package_sources()
    pkg, src = sources["ministacks.lm.model"]
    sources["ministacks.lm.model"] = (pkg, src + "\n\ndef _planted():\n    from ..stages.route import route_stage\n")
    found = upward_imports(import_graph(sources))
    assert found == ["ministacks.lm.model (layer 2) imports ministacks.stages.route (layer 14)"]


def test_a_planted_circle_is_caught_around_a_loop():
    sources = package_sources()
    # training.sft -> training.nullspace already holds (nullspace uses the ExampleSet); close a three-module loop
    for module, line in (("ministacks.training.nullspace", "from . import continual"),
                         ("ministacks.training.continual", "from .sft import train_round"),
                         ("ministacks.training.sft", "if False:\n    from .nullspace import randomized_svd")):
        pkg, src = sources[module]
        sources[module] = (pkg, src + "\n" + line + "\n")
    found = circles(import_graph(sources))
    assert any({"ministacks.training.nullspace", "ministacks.training.sft"} <= set(g) for g in found)
    assert upward_imports(import_graph(sources)) == []  # a circle inside one layer is not an upward import


def test_a_type_checking_import_counts():
    graph = import_graph({"ministacks.lm.model": (False, "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                         "    from ..presets import Preset\n"),
                          "ministacks.presets": (False, "")})
    assert upward_imports(graph) == ["ministacks.lm.model (layer 2) imports ministacks.presets (layer 12)"]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_is_past_400_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= 420, f"{path.relative_to(PACKAGE.parent)} has {n} lines: a file past ~400 lines is probably two"
