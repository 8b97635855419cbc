"""Fault injection (issue 19): concurrent writers, kill -9, a full disk, tampered and
corrupt files, hostile names. Each fault is one line with its exit code (2 bad input,
1 environment), and what the run recorded is unchanged."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import small_config, tree_digest, without_timings
from cli import app
from copal.rundir import RunDir

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line(result, code: int, *needles) -> str:
    """`result` exited with `code` after exactly one `copal: error:` line naming the needles
    and nothing else on stderr."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("copal: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def one_error(result, code: int, *needles) -> str:
    """A process that ran the flow: Prefect's and copal's routine lines may precede the error,
    but it is one `copal: error:` line, the last, with no traceback nor ERROR report."""
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("copal: error:"), result.stderr
    assert sum("copal: error:" in line for line in lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "| ERROR" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def recorded(root: Path) -> str:
    """A digest of what a run recorded: its steps, HEAD and config."""
    root = Path(root)
    return tree_digest(root / "steps") + (root / "HEAD").read_text() + (root / "config.yaml").read_text()


def no_partials(root: Path) -> bool:
    return not [p for p in Path(root).rglob("*") if p.name.endswith(".partial")]


def _write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, llama_dir, corpus_dir, prefect_api):
    """A tracked 2-step run (alpha, beta) and its config."""
    root = tmp_path_factory.mktemp("faults")
    os.environ["COPAL_DATA_DIR"] = str(root / "arrow")
    config = small_config(llama_dir, corpus_dir, name="faults",
                          domains=[f"text:{corpus_dir / d}.txt" for d in ("alpha", "beta")])
    path = _write_config(root / "faults.yaml", config)
    result = invoke("run", path, "--out", root / "run")
    assert result.exit_code == 0, result.output
    yield root, path, config
    os.environ.pop("COPAL_DATA_DIR", None)


@pytest.fixture
def run_copy(finished, tmp_path):
    root, _, _ = finished
    shutil.copytree(root / "run", tmp_path / "run")
    return tmp_path / "run"


def _state_file(run: Path, step: int) -> Path:
    return sorted((run / f"steps/{step}/sensitivity").glob("block-*.safetensors"))[0]


def _rewrite_tensors(path: Path, change) -> None:
    """Rewrite a safetensors file (a valid one) with `change(name, tensor)` applied."""
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {name: change(name, handle.get_tensor(name)) for name in handle.keys()}
    save_file(tensors, str(path), metadata=metadata)


def _reverse_first_float(name, tensor):
    if name.endswith(".zipped"):  # sym16z: a float16 half deflated as its high bytes then its low bytes
        raw = zlib.decompress(tensor.numpy().tobytes())
        high, low = raw[:len(raw) // 2], raw[len(raw) // 2:]
        return torch.frombuffer(bytearray(zlib.compress(high[::-1] + low[::-1])), dtype=torch.uint8)
    return tensor.flip(0).contiguous() if tensor.is_floating_point() and tensor.numel() > 1 else tensor


# ----------------------------------------------------------------------------- one writer


def test_a_second_writer_gets_one_line_naming_the_holder(run_copy, finished, corpus_dir):
    _, path, config = finished
    before = recorded(run_copy)
    holder = f"PID {os.getpid()} on {socket.gethostname()}"
    more = _write_config(run_copy.parent / "more.yaml",
                         {**config, "domains": config["domains"] + [f"text:{corpus_dir / 'gamma'}.txt"]})
    with RunDir(run_copy).lock():
        one_line(invoke("rollback", "--run", run_copy, "--step", 1), 2, str(run_copy), holder)
        one_line(invoke("run", more, "--out", run_copy), 2, str(run_copy), holder)
        one_line(invoke("step", f"text:{corpus_dir / 'gamma'}.txt", "--run", run_copy), 2, holder)
        assert invoke("history", "--run", run_copy).exit_code == 0  # readers read on
    assert recorded(run_copy) == before and no_partials(run_copy)


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(run_copy):
    (run_copy / ".lock").write_text("PID 999999 on elsewhere\n")
    result = invoke("rollback", "--run", run_copy, "--step", 1)
    assert result.exit_code == 0, result.output
    assert "taking over the lock of PID 999999 on elsewhere" in result.stderr
    assert (run_copy / "HEAD").read_text() == "1\n" and (run_copy / ".lock").read_text() == ""


def _cli(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_concurrent_run_is_refused_and_kill_9_then_resume_is_identical(finished, tmp_path):
    root, path, _ = finished
    run = tmp_path / "run"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    first = _cli(["run", path, "--out", run], env, start_new_session=True)
    deadline = time.time() + 300
    while not (run / "steps/.2.partial").exists():
        assert first.poll() is None and time.time() < deadline, first.stdout.read() if first.poll() else "timeout"
        time.sleep(0.05)
    one_line(invoke("run", path, "--out", run), 2, f"PID {first.pid} on {socket.gethostname()}")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (run / "steps/1").is_dir() and not (run / "steps/2").exists()
    resumed = invoke("run", path, "--out", run)
    assert resumed.exit_code == 0, resumed.output
    assert f"taking over the lock of PID {first.pid}" in resumed.stderr
    assert no_partials(run)
    assert tree_digest(run / "steps/2/sensitivity") == tree_digest(root / "run/steps/2/sensitivity")
    assert (run / "steps/2/masks.safetensors").read_bytes() == (root / "run/steps/2/masks.safetensors").read_bytes()
    assert without_timings(json.loads((run / "metrics.json").read_text())) == \
        without_timings(json.loads((root / "run/metrics.json").read_text()))


# ----------------------------------------------------------------------------- checked step files


def test_every_step_records_its_files_digests_and_verify_checks_a_run(finished):
    root, _, _ = finished
    from copal.digests import tree_digests

    for step in (1, 2):
        folder = root / f"run/steps/{step}"
        files = json.loads((folder / "step.json").read_text())["files"]
        assert files == tree_digests(folder) and "masks.safetensors" in files
    result = invoke("verify", "--run", root / "run")
    assert result.exit_code == 0 and "2 step(s) verified" in result.stdout, result.output


def test_a_tampered_state_is_refused_by_every_reader(run_copy, finished, corpus_dir):
    _, path, config = finished
    state = _state_file(run_copy, 1)
    _rewrite_tensors(state, _reverse_first_float)  # still a valid file, other values
    before = tree_digest(run_copy)
    name = str(state.relative_to(run_copy.parent))
    for args in (["rollback", "--run", run_copy, "--step", 1], ["replay", "--run", run_copy, "--step", 2],
                 ["export", "--run", run_copy, "--step", 1, "--out", run_copy.parent / "x"],
                 ["history", "--run", run_copy, "--verify"], ["verify", "--run", run_copy]):
        one_line(invoke(*args), 2, name, "SHA-256")
    assert tree_digest(run_copy) == before and not (run_copy.parent / "x").exists()

    head_state = _state_file(run_copy, 2)  # what resuming reads
    _rewrite_tensors(head_state, _reverse_first_float)
    before = tree_digest(run_copy)
    more = _write_config(run_copy.parent / "more.yaml",
                         {**config, "domains": config["domains"] + [f"text:{corpus_dir / 'gamma'}.txt"]})
    one_line(invoke("run", more, "--out", run_copy), 2, str(head_state.relative_to(run_copy.parent)))
    one_line(invoke("step", f"text:{corpus_dir / 'gamma'}.txt", "--run", run_copy), 2, "steps/2/sensitivity")
    assert tree_digest(run_copy) == before


def test_a_flipped_or_truncated_mask_file_is_refused(run_copy):
    masks = run_copy / "steps/2/masks.safetensors"
    data = bytearray(masks.read_bytes())
    data[-1] ^= 0x01  # inside the packed bits: the file still loads
    masks.write_bytes(bytes(data))
    one_line(invoke("export", "--run", run_copy, "--step", 2, "--out", run_copy.parent / "x"), 2,
             "steps/2/masks.safetensors")
    truncated = run_copy / "steps/1/masks.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:50])
    before = tree_digest(run_copy)
    one_line(invoke("rollback", "--run", run_copy, "--step", 1), 2, "steps/1/masks.safetensors")
    one_line(invoke("history", "--run", run_copy, "--verify"), 2, "steps/1/masks.safetensors")
    assert tree_digest(run_copy) == before and not (run_copy.parent / "x").exists()
    assert no_partials(run_copy.parent)


def test_replay_compares_the_state_too(run_copy):
    """A state changed *and* its digest updated: the masks replay the same, the state does not."""
    state = _state_file(run_copy, 2)
    _rewrite_tensors(state, _reverse_first_float)
    record_path = run_copy / "steps/2/step.json"
    record = json.loads(record_path.read_text())
    from copal.digests import file_digest

    record["files"][state.relative_to(run_copy / "steps/2").as_posix()] = file_digest(state)
    record_path.write_text(json.dumps(record))
    result = invoke("replay", "--run", run_copy, "--step", 2)
    assert result.exit_code == 1, result.output
    assert "sensitivity/block-" in result.stderr and "bit for bit" not in result.stdout


def test_old_steps_without_digests_still_read_with_a_note_and_nan_state_is_one_line(run_copy):
    for step in (1, 2):
        path = run_copy / f"steps/{step}/step.json"
        record = json.loads(path.read_text())
        del record["files"]
        path.write_text(json.dumps(record))
    result = invoke("verify", "--run", run_copy)
    assert result.exit_code == 0 and "2 recorded without digests" in result.stdout, result.output
    assert invoke("history", "--run", run_copy, "--verify").exit_code == 0

    def poison(name, tensor):
        if tensor.is_floating_point():
            tensor = tensor.clone()
            tensor.view(-1)[0] = float("nan")
        return tensor

    _rewrite_tensors(_state_file(run_copy, 1), poison)
    one_line(invoke("replay", "--run", run_copy, "--step", 2), 2, "NaN or Inf")


# ----------------------------------------------------------------------------- names


HOSTILE = ["{outside}/passwd", "../../{leaf}", "x(y)", "my domain (v2)", "bad!name#1", "a" * 300, ".hidden"]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_domain_names_write_nothing_anywhere(tmp_path, corpus_dir, hostile):
    outside = tmp_path / "outside"
    name = hostile.format(outside=outside, leaf="escaped")
    cache = tmp_path / "cache"
    spec = f"{name}=text:{corpus_dir / 'alpha'}.txt"
    one_line(invoke("ingest", spec, "--data-dir", cache), 2, "not a valid name")
    assert not outside.exists() and not cache.exists()
    assert not list(tmp_path.parent.glob("escaped*"))


def test_hostile_names_in_a_run_fail_before_any_work(tmp_path, llama_dir, corpus_dir, data_dir):
    config = _write_config(tmp_path / "c.yaml", small_config(llama_dir, corpus_dir))
    deep = tmp_path / "some/dir/deep"
    cases = [(["--set", f"domains=['{deep}/y=text:{corpus_dir / 'alpha'}.txt']"], "not a valid name"),
             (["--set", "name=x(y)"], "name"), (["--set", "name=" + "r" * 65], "name")]
    for extra, needle in cases:
        one_line(invoke("run", config, *extra, "--out", tmp_path / "run"), 2, needle)
    assert not (tmp_path / "some").exists() and not (tmp_path / "run").exists() and not data_dir.exists()


def test_cache_paths_come_from_a_digest_inside_the_cache(tmp_path, corpus_dir):
    cache = tmp_path / "cache"
    result = invoke("ingest", f"legal=text:{corpus_dir / 'alpha'}.txt", "--data-dir", cache)
    assert result.exit_code == 0, result.output
    path = Path(json.loads(result.stdout)["path"])
    assert path.parent == cache and "legal" not in path.name and "alpha" not in path.name


def test_hints_show_valid_names(tmp_path, corpus_dir):
    from copal.sources import parse_source
    from copal.domains import RunDomains
    from copal.tokens import TextStart

    spaced = tmp_path / "my file.txt"
    shutil.copy(corpus_dir / "alpha.txt", spaced)
    line = one_line(invoke("ingest", f"text:{spaced}", "--data-dir", tmp_path / "cache"), 2, "name it, e.g.")
    assert parse_source(line.split("name it, e.g. ")[1]).name == "my_file"

    domains = RunDomains(None, None, start=TextStart())  # no tokenizer: the name check needs none
    domains.domains.append(type("D", (), {"name": "docs"})())
    with pytest.raises(Exception) as raised:
        domains.add(f"docs=text:{corpus_dir / 'beta'}.txt")
    hint = str(raised.value).split("name it, e.g. ")[1]
    assert parse_source(hint).name == "docs-2" and parse_source(hint).location == f"{corpus_dir / 'beta'}.txt"


# ----------------------------------------------------------------------------- every fault one line


def test_out_that_is_a_file_or_under_one_is_one_line(tmp_path, llama_dir, corpus_dir, data_dir):
    config = _write_config(tmp_path / "c.yaml", small_config(llama_dir, corpus_dir))
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line(invoke("run", config, "--out", afile), 2, str(afile), "not a directory")
    one_line(invoke("run", config, "--out", afile / "sub"), 2, "not a directory")
    assert afile.read_text() == "x"


def test_export_to_a_symlink_or_a_full_disk_leaves_nothing(run_copy, monkeypatch):
    target = run_copy.parent / "empty"
    target.mkdir()
    link = run_copy.parent / "link"
    link.symlink_to(target)
    one_line(invoke("export", "--run", run_copy, "--step", 2, "--out", link), 2, "symbolic link")

    import copal.export

    class Full:
        def save_pretrained(self, folder, **kwargs):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "model.safetensors").write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(copal.export, "load_step_model", lambda *args: (Full(), Full()))
    one_line(invoke("export", "--run", run_copy, "--step", 2, "--out", run_copy.parent / "out"), 1,
             "no space left on device")
    assert not (run_copy.parent / "out").exists() and no_partials(run_copy.parent)
    assert list(target.iterdir()) == []


def test_a_file_name_that_is_not_utf8_is_one_line(tmp_path, corpus_dir):
    folder = tmp_path / "texts"
    folder.mkdir()
    shutil.copy(corpus_dir / "alpha.txt", folder / "good.txt")
    with open(os.path.join(bytes(folder), b"bad-\xff.txt"), "wb") as stream:
        stream.write(b"some text\n\nmore text\n")
    one_line(invoke("ingest", f"text:{folder}", "--data-dir", tmp_path / "cache"), 2, "not UTF-8")


@pytest.mark.parametrize("record", ["tracking.json", "dense.json"])
def test_a_truncated_run_record_is_one_line_and_changes_nothing(run_copy, finished, corpus_dir, record):
    _, _, config = finished
    path = run_copy / record
    path.write_text(path.read_text()[:20])
    before = tree_digest(run_copy)
    more = _write_config(run_copy.parent / "more.yaml",
                         {**config, "domains": config["domains"] + [f"text:{corpus_dir / 'gamma'}.txt"]})
    one_line(invoke("run", more, "--out", run_copy), 2, record, "corrupt")
    assert tree_digest(run_copy) == before


def test_an_unreachable_hub_is_one_line_at_once(tmp_path, corpus_dir, data_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    started = time.time()
    config = _write_config(tmp_path / "c.yaml", small_config("someorg/nosuchmodel", corpus_dir))
    one_line(invoke("run", config, "--out", tmp_path / "run"), 1, "someorg/nosuchmodel", "cannot be reached")
    assert time.time() - started < 30 and not (tmp_path / "run").exists()


def _copal_process(args, tmp_path, prelude=""):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    code = f"import sys\n{prelude}\nfrom cli import main\nsys.argv[0] = 'copal'\nmain()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)


FULL_DISK = {
    "no room for the step": "import shutil\nshutil.disk_usage = lambda path: shutil._ntuple_diskusage(1 << 40, "
                            "1 << 40, 1000)",
    "ENOSPC while writing": "import errno, copal.state\n"
                            "def full(tensors, filename, metadata=None):\n"
                            "    open(filename, 'wb').write(b'x' * 100)\n"
                            "    raise OSError(errno.ENOSPC, 'No space left on device', filename)\n"
                            "copal.state.save_file = full",
}


@pytest.mark.parametrize("case", FULL_DISK)
def test_a_full_disk_is_one_line_and_records_nothing(run_copy, finished, corpus_dir, tmp_path, case):
    _, _, config = finished
    more = _write_config(tmp_path / "more.yaml",
                         {**config, "domains": config["domains"] + [f"text:{corpus_dir / 'gamma'}.txt"]})
    before = tree_digest(run_copy / "steps") + (run_copy / "HEAD").read_text()
    result = _copal_process(["run", more, "--out", run_copy], tmp_path, FULL_DISK[case])
    line = one_error(result, 1, "free" if case == "no room for the step" else "no space left on device")
    assert "steps" in line
    assert tree_digest(run_copy / "steps") + (run_copy / "HEAD").read_text() == before
    assert no_partials(run_copy) and not (run_copy / "steps/3").exists()


# ----------------------------------------------------------------------------- no leftovers


def test_the_temporary_prefect_api_dies_with_a_killed_command(tmp_path):
    code = ("import os\nfrom flows.api import TemporaryApi, prefect_settings\nprefect_settings()\n"
            "api = TemporaryApi()\napi.ready()\n"
            "from prefect.server.api.server import SubprocessASGIServer\n"
            "print(SubprocessASGIServer().server_process.pid, flush=True)\nos.kill(os.getpid(), 9)\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    out, log = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(log, "w") as stderr:  # files, not pipes: a live server would hold a pipe
        returncode = subprocess.run([sys.executable, "-c", code], env=env, stdout=stdout, stderr=stderr,
                                    timeout=300).returncode
    assert returncode == -signal.SIGKILL, log.read_text()
    server = int(out.read_text().split()[0])
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":  # exited, not yet reaped
            return
        time.sleep(0.2)
    os.kill(server, signal.SIGKILL)
    pytest.fail("the temporary Prefect API outlived its killed command")


def test_recording_a_step_in_mlflow_is_idempotent(run_copy, finished):
    from mlflow import MlflowClient

    from copal.rundir import summarize
    from tasks.tracking import Tracker

    tracking = json.loads((run_copy / "tracking.json").read_text())
    assert tracking["model_name"] == f"faults-{tracking['parent_run_id'][:8]}"  # the run's identity
    original = tracking["steps"].pop("2")  # as if killed after registering, before tracking.json
    (run_copy / "tracking.json").write_text(json.dumps(tracking))
    client = MlflowClient(tracking["tracking_uri"])
    client.create_run(tracking["experiment_id"], tags={"mlflow.parentRunId": tracking["parent_run_id"],
                                                       "copal.step": "2"})  # a killed attempt's leftover
    directory = RunDir(run_copy)
    config, _ = directory.read_config()
    tracker = Tracker(directory)
    assert tracker.record_step(directory.step(2), summarize(directory, config, head=2), config) == original
    children = client.search_runs([tracking["experiment_id"]],
                                  f"tags.mlflow.parentRunId = '{tracking['parent_run_id']}' and "
                                  f"tags.`copal.step` = '2'")
    assert [run.info.run_id for run in children] == [original["run_id"]]
    versions = client.search_model_versions(f"name = '{tracking['model_name']}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]


def test_trust_remote_code_from_a_run_directory_needs_the_command_line_too(run_copy, corpus_dir):
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    (run_copy / "config.yaml").write_text(yaml.safe_dump({**config, "trust_remote_code": True}, sort_keys=False))
    out = run_copy.parent / "exported"
    for args in (["export", "--run", run_copy, "--step", 2, "--out", out], ["replay", "--run", run_copy, "--step", 2],
                 ["step", f"text:{corpus_dir / 'gamma'}.txt", "--run", run_copy]):
        one_line(invoke(*args), 2, "trust_remote_code", "--trust-remote-code")
    assert not out.exists()
    result = invoke("export", "--run", run_copy, "--step", 2, "--out", out, "--trust-remote-code")
    assert result.exit_code == 0, result.output
