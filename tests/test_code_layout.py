"""The code's shape, as issue 22 set it: no import cycle among the project's modules,
no file over 400 lines and no function over 60 in the shipped packages, and nothing
that points outside the repository for the spec."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("copal", "flows", "tasks", "cli")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("**/*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules module `name` (at `path`) imports, at any depth of its code
    (function-level imports too). `from package import submodule` counts as importing
    the submodule; importing a submodule runs its packages' __init__ first, so those
    count too, except the packages `name` itself is inside (Python is already
    initialising them)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules.keys()
            found |= submodules
            if len(submodules) < len(node.names) and node.module in modules:
                found.add(node.module)
    packages = {".".join(module.split(".")[:depth]) for module in found for depth in range(1, module.count(".") + 1)}
    own = {".".join(name.split(".")[:depth]) for depth in range(1, name.count(".") + 2)}
    return found | ({package for package in packages if package in modules} - own)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return path[path.index(imported):] + [imported]
            if imported not in state and (found := visit(imported)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) - {name} for name, path in modules.items()}
    assert _cycle(graph) is None, " → ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_files_and_functions_are_short(package):
    long = []
    for path in sorted((ROOT / package).glob("**/*.py")):
        source = path.read_text()
        if len(source.splitlines()) > MAX_FILE_LINES:
            long.append(f"{path.relative_to(ROOT)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not long, long


def test_nothing_points_outside_the_repository():
    outside = "../" + "shared"
    skipped = {".venv", ".git", "data", "runs", "mlruns", "build"}  # not the project's text
    cited = [str(path.relative_to(ROOT)) for path in ROOT.rglob("*")
             if path.suffix in {".py", ".md", ".yaml", ".toml", ".sh", ".txt", ".cfg"} and path.is_file()
             and not skipped & set(path.relative_to(ROOT).parts) and outside in path.read_text(errors="replace")]
    assert not cited, cited
