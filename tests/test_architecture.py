"""The layout's own rules, checked on the source: no import cycles, small modules, no private names across modules.

Imports inside functions count too: a cycle hidden in a function body is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shardformat", "hybrid_common", "stage1_extract", "stage2_classify", "pipeline")
MAX_LINES = 400  # non-blank lines per module
MAX_MODULES = 12  # modules per folder, __init__ and __main__ not counted


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every project import in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    out.append((f"{target}.{alias.name}", None, node.lineno))
                else:
                    out.append((target, alias.name, node.lineno))
    return [(m, n, line) for m, n, line in out if m.split(".")[0] in PACKAGES]


def _graph() -> dict[str, set[str]]:
    graph = defaultdict(set)
    for module in MODULES:
        for target, _name, _line in _imports(module):
            # importing a.b.c runs a/__init__ and a/b/__init__ too; a module's own parent packages run anyway
            # (not an edge), unless the module imports a name from its package's __init__ itself
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                explicit = i == len(parts)
                if prefix in MODULES and prefix != module and (explicit or not module.startswith(prefix + ".")):
                    graph[module].add(prefix)
    return graph


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


each_package = pytest.mark.parametrize("package", PACKAGES)


@each_package
def test_no_import_cycles(package):
    graph = _graph()
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    counter = [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 and any(_in(m, package) for m in component):
                cycles.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            visit(module)
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(map(str, cycles))


@each_package
def test_modules_stay_small(package):
    big = {m: n for m, p in MODULES.items() if _in(m, package)
           if (n := sum(1 for line in p.read_text().splitlines() if line.strip())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} non-blank lines: {big}"


@each_package
def test_folders_stay_small(package):
    counts = defaultdict(int)
    for module, path in MODULES.items():
        if _in(module, package) and path.name not in ("__init__.py", "__main__.py"):
            counts[path.parent.relative_to(ROOT)] += 1
    crowded = {str(k): v for k, v in counts.items() if v > MAX_MODULES}
    assert not crowded, f"folders with more than {MAX_MODULES} modules: {crowded}"


@each_package
def test_no_private_name_imported_across_modules(package):
    offences = []
    for module in (m for m in MODULES if _in(m, package)):
        for target, name, line in _imports(module):
            private_name = name is not None and name.startswith("_") and not name.startswith("__")
            private_module = any(part.startswith("_") and not part.startswith("__") for part in target.split("."))
            if private_module:
                # a private module is fine from inside the package that owns it
                owner = ".".join(target.split(".")[:-1])
                if module == owner or module.startswith(owner + "."):
                    private_module = False
            if private_name or private_module:
                offences.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}"
                                + (f".{name}" if name else ""))
    assert not offences, "private names imported across modules:\n" + "\n".join(offences)


@pytest.mark.parametrize("package", ["stage1_extract", "stage2_classify"])
def test_test_tools_do_not_ship(package):
    shipped = [m for m in MODULES if m.startswith(package) and m.rsplit(".", 1)[-1] in
               ("synthetic", "fault_hooks", "faults")]
    assert not shipped, f"test helpers inside the package: {shipped}"


MAX_FUNCTION_LINES = 100


@each_package
def test_functions_stay_short(package):
    long = []
    for module, path in ((m, p) for m, p in MODULES.items() if _in(m, package)):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {length} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(ROOT)) for p in MODULES.values() if f"`{p.relative_to(ROOT)}`" not in page]
    assert not missing, f"docs/architecture.md has no line for: {missing}"
