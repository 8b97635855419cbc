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
