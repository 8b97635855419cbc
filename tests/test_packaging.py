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


def test_the_wheel_runs_a_demo_from_another_directory_and_keeps_state_there(tmp_path):
    """Build the wheel, install it into a fresh venv (this environment's packages visible
    through a .pth, copal itself only from the wheel), and run a one-domain demo from an
    empty folder: the shipped demo config and model are found, and MLflow, the Arrow cache
    and the run land in that folder, nothing in site-packages; snapshots are said to be off."""
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig

    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside the sources
    for part in ("cli", "copal", "flows", "tasks", "configs", "data/models/reference"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / file, source / file)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("copal-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "project-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)],
                   check=True, timeout=300)
    assert (site / "copal" / "shipped" / "configs" / "demo.yaml").is_file()

    work = tmp_path / "elsewhere"
    work.mkdir()
    corpus = work / "notes.txt"
    corpus.write_text("\n\n".join(f"Note {i}: the shipped demo runs from any folder, and keeps its state "
                                  f"there. Item {i * 7 % 13} of the list." for i in range(400)))
    env = {key: value for key, value in os.environ.items()
           if key not in ("MLFLOW_TRACKING_URI", "COPAL_DATA_DIR", "PYTHONPATH", "COPAL_HOME")}
    before = {p for p in site.rglob("*")}
    done = subprocess.run([venv / "bin" / "copal", "run", "--set", f"domains=[text:{corpus}]",
                           "--set", "calibration.nsamples=4", "--set", "evaluation.max_tokens=1024"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import copal

    assert Path(copal.__file__).resolve().parent != (site / "copal")  # the tests' copal is the checkout's
    assert (work / "runs" / "demo" / "metrics.json").is_file()
    assert (work / "mlflow.db").is_file() and (work / "mlruns").is_dir() and (work / "data" / "arrow").is_dir()
    assert "DVC snapshots are off" in done.stderr and done.stderr.count("DVC snapshots are off") == 1
    assert "copal history --run runs/demo" in done.stderr
    created = {p for p in site.rglob("*")} - before
    assert not [p for p in created if "__pycache__" not in p.parts], created
