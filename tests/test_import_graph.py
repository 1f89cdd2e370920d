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
