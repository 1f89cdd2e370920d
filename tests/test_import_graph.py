"""The import graph of ``nnunet_meddinov3`` and ``pretrain`` has no cycles.

Edges come from the source (``ast``), module-level *and* function-level imports alike: a cycle hidden
behind a function-local import still ties the modules together, it only fails later. An import of
``a.b.c`` from module ``m`` is an edge to ``a.b.c`` and to every package on the way that is not already
a package of ``m`` (importing a sibling's package runs its ``__init__`` first, an import of one's own
package does not). ``from pkg import name`` points at the module that defines ``name``, found by
importing ``pkg`` (packages such as ``nnunet_meddinov3.checkpoints`` export names lazily).
"""
from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nnunet_meddinov3", "pretrain")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _defining_module(package: str, name: str, modules: dict[str, Path]) -> str:
    """The module ``from package import name`` really depends on."""
    if f"{package}.{name}" in modules:
        return f"{package}.{name}"
    obj = getattr(importlib.import_module(package), name, None)
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    defined_in = getattr(obj, "__module__", None)
    return defined_in if defined_in in modules else package


def _targets(module: str, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    own_package = module if _is_package(module, modules) else module.rpartition(".")[0]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolve against this module's package
        base = own_package.split(".")
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source not in modules:
        return [source]
    if not _is_package(source, modules):
        return [source]
    return [_defining_module(source, alias.name, modules) for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: set() for name in modules}
    for module, path in modules.items():
        own = module.split(".")
        ancestors = {".".join(own[:i]) for i in range(1, len(own) + 1)}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(module, node, modules):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    if name in modules and name not in ancestors and (i == len(parts) or _is_package(name, modules)):
                        graph[module].add(name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a self-import)."""
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_and_lazy_package_imports():
    graph = import_graph()
    # a function-local import in the CLI, through the lazily exporting checkpoints package
    assert "nnunet_meddinov3.checkpoints.loading" in graph["nnunet_meddinov3.cli.weights"]
    # a relative import
    assert "pretrain.model" in graph["pretrain.export"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles between the project's modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_weights_flow_points_one_way():
    """The encoder knows nothing about files; the intensity schema imports no torch; the format
    reads/writes files without knowing how foreign layouts are converted or loaded."""
    graph = import_graph()
    assert not {m for m in graph["nnunet_meddinov3.network.encoder"] if m.startswith("nnunet_meddinov3.checkpoints")}
    assert not {m for m in graph["nnunet_meddinov3.data.intensity"] if m.startswith("nnunet_meddinov3.")}
    assert graph["nnunet_meddinov3.checkpoints.keys"] == set()
    format_deps = graph["nnunet_meddinov3.checkpoints.format"]
    assert not format_deps & {"nnunet_meddinov3.checkpoints.loading", "nnunet_meddinov3.checkpoints.conversion",
                              "nnunet_meddinov3.checkpoints.converters"}


# Function-level imports of our own modules are allowed only where they are documented lazy imports:
# the command lines import a subcommand's machinery only when it runs, so `--help` stays fast.
LAZY_IMPORTS_ALLOWED = {
    "nnunet_meddinov3/cli/": "subcommand modules import their machinery when they run (cli/main.py)",
    "pretrain/cli.py": "python -m pretrain imports the engine only for the command that runs",
    "pretrain/configs/schema.py": "reading a config stays free of torch; validation imports the encoder registry",
}


def test_imports_between_our_modules_are_at_module_top():
    late = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            if any(where.startswith(prefix) for prefix in LAZY_IMPORTS_ALLOWED):
                continue
            for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(function):
                    ours = (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGES))
                            ) or (isinstance(node, ast.Import) and any(a.name.startswith(PACKAGES) for a in node.names))
                    if ours:
                        late.append(f"{where}:{node.lineno}")
    assert not late, f"function-level imports of our own modules (move them to the top, or document why): {late}"


# The layers of nnunet_meddinov3, lowest first: a module imports only from its own layer or below (the
# arrows of DEVELOPERS' layout: cli -> features -> training/checkpoints -> network). Top-level modules
# (durable files) and data/ are the ground floor. pretrain builds on nnunet_meddinov3; of the latter only
# cli/ reaches pretrain.
LAYERS = {
    "nnunet_meddinov3": 0, "data": 0, "network": 1, "checkpoints": 2, "training": 3,
    "evaluation": 4, "inference": 4, "benchmark": 4, "visualize": 4, "nnunet_ext": 4, "cli": 5,
}
PRODUCT_FILE_LINE_LIMIT = 450


def area(module: str) -> str:
    """The folder a module belongs to: ``training`` for nnunet_meddinov3.training.x, ``pretrain`` for
    anything in pretrain, ``nnunet_meddinov3`` for a top-level module."""
    parts = module.split(".")
    if parts[0] == "pretrain":
        return "pretrain"
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "nnunet_meddinov3"


def back_up_arrows(graph: dict[str, set[str]]) -> list[str]:
    arrows = []
    for module, targets in graph.items():
        for target in targets:
            if area(module) == "pretrain" or area(target) == area(module):
                continue
            if area(target) == "pretrain":
                if area(module) != "cli":
                    arrows.append(f"{module} -> {target}")
            elif LAYERS[area(target)] > LAYERS[area(module)]:
                arrows.append(f"{module} -> {target}")
    return sorted(arrows)


def folder_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Which folders (``area``) import which, from the module graph."""
    folders: dict[str, set[str]] = {area(m): set() for m in graph}
    for module, targets in graph.items():
        folders[area(module)] |= {area(t) for t in targets} - {area(module)}
    return folders


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """A node's floor: 0 if it imports none of the others, else one above the highest one it imports."""
    floor: dict[str, int] = {}

    def visit(node, path=()):
        if node not in floor:
            if node in path:  # a cycle: counted by find_cycles, not here
                return 0
            floor[node] = 1 + max((visit(t, path + (node,)) for t in graph[node]), default=-1)
        return floor[node]

    for node in graph:
        visit(node)
    return floor


def product_file_lengths() -> dict[str, int]:
    return {path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def figures() -> dict:
    graph, lengths = import_graph(), product_file_lengths()
    folder_floor = floors(folder_graph(graph))
    largest = max(lengths, key=lengths.get)
    return {
        "modules": len(graph),
        "largest file": f"{largest} ({lengths[largest]} lines)",
        f"files over {PRODUCT_FILE_LINE_LIMIT} lines": sorted(p for p, n in lengths.items() if n > PRODUCT_FILE_LINE_LIMIT),
        "import cycles": find_cycles(graph),
        "back-up arrows": back_up_arrows(graph),
        "floor of inference/": folder_floor["inference"],
        "floors of the folders": dict(sorted(folder_floor.items(), key=lambda item: item[1])),
    }


def test_no_arrow_points_back_up_the_layers():
    arrows = back_up_arrows(import_graph())
    assert not arrows, "imports against the layers (cli -> features -> training/checkpoints -> network):\n" + \
        "\n".join(arrows)


def test_inference_does_not_import_training():
    graph = import_graph()
    assert not {(m, t) for m, targets in graph.items() if area(m) == "inference"
                for t in targets if area(t) == "training"}


def test_only_the_command_line_reaches_pretrain():
    graph = import_graph()
    assert not {m for m, targets in graph.items() if area(m) not in ("pretrain", "cli")
                and any(area(t) == "pretrain" for t in targets)}


def test_no_product_file_is_over_the_line_limit():
    long_files = {p: n for p, n in product_file_lengths().items() if n > PRODUCT_FILE_LINE_LIMIT}
    assert not long_files, f"split these along their concerns: {long_files}"


def test_back_up_arrows_are_found():
    graph = {"nnunet_meddinov3.network.x": {"nnunet_meddinov3.training.y"}, "nnunet_meddinov3.training.y": set(),
             "nnunet_meddinov3.cli.z": {"pretrain.engine"}, "pretrain.engine": set()}
    assert back_up_arrows(graph) == ["nnunet_meddinov3.network.x -> nnunet_meddinov3.training.y"]
    assert floors(graph)["nnunet_meddinov3.network.x"] == 1
    assert floors(folder_graph(graph)) == {"network": 1, "training": 0, "cli": 1, "pretrain": 0}


if __name__ == "__main__":  # the figures the restructuring is judged by: python tests/test_import_graph.py
    for name, value in figures().items():
        print(f"{name}: {value}")
