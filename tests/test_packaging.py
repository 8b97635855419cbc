"""Packaging: DVC stages run in any environment with copal on PATH, and the
package declares what it imports and what requirements.txt pins."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _stage_commands(stages: dict) -> dict[str, str]:
    """Stage name → command, foreach stages expanded the way DVC names them (stage@item)."""
    commands = {}
    for name, stage in stages.items():
        if "foreach" in stage:
            for item in stage["foreach"]:
                commands[f"{name}@{item}"] = stage["do"]["cmd"].replace("${item}", str(item))
        else:
            commands[name] = stage["cmd"]
    return commands


def test_dvc_stages_call_copal_from_path_and_the_lock_agrees():
    commands = _stage_commands(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert commands
    for name, command in commands.items():
        assert ".venv" not in command, (name, command)
        assert command.startswith("copal "), (name, command)
    # dvc.lock records the same commands, so `dvc status` sees no changed command.
    locked = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    assert {name: stage["cmd"] for name, stage in locked.items()} == commands
    makefile = (ROOT / "Makefile").read_text()
    assert 'PATH="$(CURDIR)/.venv/bin:$$PATH" .venv/bin/dvc repro' in makefile


def _normalize(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[dict, dict]:
    """pyproject's runtime dependencies (normalised name → Requirement) and its
    extras (extra → the same)."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_normalize(r.name): r for r in map(Requirement, project["dependencies"])}
    extras = {extra: {_normalize(r.name): r for r in map(Requirement, group)}
              for extra, group in project.get("optional-dependencies", {}).items()}
    return runtime, extras


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt: {line!r} is not an exact pin"
            pins[_normalize(name.split("[")[0])] = version  # lm-eval[hf]: the extra is not the name
    return pins


def test_every_pinned_package_is_declared_with_a_range_the_pin_meets():
    runtime, extras = _declared()
    declared = dict(runtime)
    for group in extras.values():
        declared.update(group)
    pins = _pins()
    assert {"prefect", "mlflow", "dvc", "matplotlib"} <= set(runtime)
    assert "pytest" in extras["test"] and "pytest" not in runtime
    for name, version in pins.items():
        assert name in declared, f"{name}=={version} is pinned in requirements.txt but not declared in pyproject"
        assert declared[name].specifier.contains(version, prereleases=True), (str(declared[name]), version)
    # … and nothing is declared that requirements.txt does not pin.
    assert set(declared) <= set(pins)


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level modules imported anywhere under copal/, flows/, tasks/ (lazy imports
    included) that are neither the standard library nor the project's own."""
    import ast
    import sys

    own = {"copal", "flows", "tasks"}
    found: dict[str, set[str]] = {}
    for package in sorted(own):
        for file in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in own and top not in sys.stdlib_module_names:
                        found.setdefault(top, set()).add(str(file.relative_to(ROOT)))
    return found


# Import names whose distribution is named otherwise (used when the module is not installed).
IMPORT_TO_DISTRIBUTION = {"yaml": "pyyaml", "google": "protobuf", "sklearn": "scikit-learn", "PIL": "pillow"}


def test_every_third_party_import_of_the_package_is_a_declared_dependency():
    from importlib.metadata import packages_distributions

    runtime, extras = _declared()
    # What the package imports must be installed with it, or with an extra of a
    # feature (never only with the tests' extra).
    available = set(runtime).union(*(group for extra, group in extras.items() if extra != "test"))
    installed = packages_distributions()
    imports = _third_party_imports()
    assert {"torch", "prefect", "mlflow", "matplotlib", "yaml"} <= set(imports)
    for module, files in sorted(imports.items()):
        candidates = {_normalize(d) for d in installed.get(module, [])} or \
            {_normalize(IMPORT_TO_DISTRIBUTION.get(module, module))}
        assert candidates & available, f"{module} (imported in {sorted(files)}) comes from {candidates}, " \
                                       f"which pyproject's dependencies do not declare"
