"""The package's import graph, read from the source (every import statement, at module level and inside functions):
no module imports itself back through others, and the layers point one way: the Hub files and the shared modules at
the root import no sub-package, and no two sub-packages import each other (eval/ reads the data formats from
gran_format.py, not from train/)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root is the granvit package
PACKAGE = "granvit"
SKIP = {"tests", "build", "outputs", "runs", "setup.py"}  # and hidden folders (.git, .venv: CI's environment is here)

ALLOWED_CYCLES = []
ALLOWED_EDGES = {("granvit.train.quickstart", "granvit.spaces.demo_examples")}  # the job writes the demo's examples


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")
            if not SKIP & set(p.relative_to(ROOT).parts) and not p.relative_to(ROOT).parts[0].startswith(".")}


def imported_modules(name: str, path: Path, modules: dict) -> dict[str, int]:
    """{granvit module imported anywhere in the file: line of its first import}."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import granvit.x.y` -> the deepest module that exists
                target = target.rpartition(".")[0]
            if target and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, dict]) -> list[set]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> str:
    """The sub-package a module belongs to (train, eval, ...), or "root" for the files at the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) else "root"


def describe(component: set, graph: dict) -> str:
    return "; ".join(f"{a} -> {b} (line {graph[a][b]})" for a in sorted(component) for b in graph[a] if b in component)


def test_the_walk_sees_module_level_and_in_function_imports():
    graph = import_graph()
    assert "granvit.train.freezing" in graph["granvit.train.trainers"]  # module level, relative
    assert "granvit.eval.run" in graph["granvit.train.runner"]  # inside a function
    assert "granvit.gran_format" in graph["granvit.eval.benchmarks"]  # absolute
    assert "granvit.eval.metrics" in graph["granvit.eval.report"]  # `from granvit.eval import metrics`
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [{"a", "b", "c"}]


def test_no_import_cycle_between_modules():
    graph = import_graph()
    found = [c for c in cycles(graph) if c not in ALLOWED_CYCLES]
    assert not found, "import cycles: " + " | ".join(describe(c, graph) for c in found)


def test_layers_point_one_way():
    """Sub-packages import the root (Hub files, console, registration, gran_format) and each other without a circle;
    the root imports no sub-package."""
    graph = import_graph()
    layers: dict[str, dict[str, tuple]] = {}
    for module, targets in graph.items():
        for target, line in targets.items():
            a, b = layer(module), layer(target)
            if a != b and (module, target) not in ALLOWED_EDGES:
                layers.setdefault(a, {}).setdefault(b, (module, target, line))
    assert not layers.get("root"), f"the root imports a sub-package: {layers.get('root')}"
    for component in cycles(layers):
        edges = [layers[a][b] for a in sorted(component) for b in layers[a] if b in component]
        raise AssertionError(f"sub-packages {sorted(component)} import each other: {edges}")
