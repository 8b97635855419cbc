"""`copal report`: a self-contained HTML page of a run's history, checked in a real browser."""

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib import image as mpimg
from typer.testing import CliRunner

from conftest import small_config
from copal import metrics, plots
from copal.config import build_config
from copal.continual import ContinualRun
from copal.rundir import RunDir
from copal.errors import InputError
from copal.report import load_history, write_report
from cli import app

# scripts/setup.sh installs Debian's chromium; a missing browser is a setup failure, not a skip.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, llama_dir, corpus_dir):
    root = tmp_path_factory.mktemp("report")
    config = small_config(llama_dir, corpus_dir, method="wanda", regime="accumulate",
                          calibration={"nsamples": 4}, evaluation={"max_tokens": 1024})
    ContinualRun(build_config(config), root / "run", data_dir=root / "arrow").run()
    return root / "run"


class _Page(HTMLParser):
    """What the checks need from a page: image sources, step-table rows, any external references."""

    def __init__(self):
        super().__init__()
        self.images, self.rows, self.external, self.tags = [], [], [], set()
        self._in_steps = self._in_body = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        for key in ("src", "href"):
            if attrs.get(key, "").startswith(("http:", "https:", "//")):
                self.external.append(attrs[key])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "table" and attrs.get("id") == "steps":
            self._in_steps = True
        if self._in_steps and tag == "tbody":
            self._in_body = True
        if self._in_body and tag == "tr":
            self.rows.append([])

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_steps = self._in_body = False

    def handle_data(self, data):
        if self._in_body and self.rows and data.strip():
            self.rows[-1].append(data.strip())


def _parse(html_text: str) -> _Page:
    page = _Page()
    page.feed(html_text)
    return page


def _chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _pixels(png_bytes: bytes) -> np.ndarray:
    return mpimg.imread(io.BytesIO(png_bytes), format="png")[..., :3]


def _distinct_colours(png_bytes: bytes) -> int:
    return len(np.unique(_pixels(png_bytes).reshape(-1, 3), axis=0))


def _colourful_share(png_bytes: bytes) -> float:
    """Share of strongly coloured pixels: plots have them, text and blank pages do not."""
    pixels = _pixels(png_bytes)
    return float((pixels.max(-1) - pixels.min(-1) > 0.3).mean())


def test_report_renders_in_a_browser(run_root, tmp_path):
    page_path = write_report(run_root, tmp_path / "report.html")
    html_text = page_path.read_text()
    source = _parse(html_text)
    assert not source.external and not {"script", "link", "iframe"} & source.tags
    assert len(source.images) == 3
    for src in source.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert _distinct_colours(base64.b64decode(src[len(prefix):])) > 20

    shot = tmp_path / "shot.png"
    result = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page_path.as_uri())
    assert shot.is_file(), result.stderr[-2000:]
    assert _colourful_share(shot.read_bytes()) > 0.02  # the plots were drawn, not just text or a blank page

    dom = _chromium(tmp_path, "--dump-dom", page_path.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = _parse(dom.stdout)
    recorded = json.loads((run_root / "metrics.json").read_text())
    assert "copal run report" in dom.stdout
    assert len(rendered.rows) == len(recorded["steps"]) == 3
    assert len(rendered.images) == 3
    for row, step, ppl in zip(rendered.rows, recorded["steps"], recorded["ppl"]):
        assert row[:2] == [str(step["step"]), step["domain"]]
        assert [plots.format_value(value) for value in ppl] == row[7:7 + len(ppl)]
    assert rendered.rows[-1][7 + len(recorded["domains"])] == plots.format_value(recorded["bwt"])


def test_bwt_after_each_step_uses_the_steps_so_far(run_root):
    history = load_history(run_root)
    recorded = json.loads((run_root / "metrics.json").read_text())
    assert history.matrix == recorded["ppl"] and history.dense == recorded["dense_ppl"]
    by_step = history.bwt_by_step()
    assert by_step[0] is None
    assert by_step[1] == pytest.approx(history.matrix[1][0] - history.matrix[0][0])
    assert by_step[-1] == pytest.approx(recorded["bwt"])
    assert history.average_by_step()[-1] == pytest.approx(recorded["avg_ppl"])


def test_report_follows_head_after_a_rollback(run_root, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_root, copy)
    RunDir(copy).set_head(2)
    page = _parse(write_report(copy).read_text())
    assert (copy / "report.html").is_file()
    assert [row[0] for row in page.rows] == ["1", "2"]
    history = load_history(copy)
    assert history.off_lineage == [3]
    assert history.bwt_by_step()[-1] == pytest.approx(metrics.bwt(history.matrix, [0, 1]))


def test_bad_run_directories_are_one_line_input_errors(tmp_path, run_root):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_steps = tmp_path / "no-steps"
    no_steps.mkdir()
    config, fingerprints = RunDir(run_root).read_config()
    RunDir(no_steps).write_config(config, fingerprints)
    cases = [(tmp_path / "missing", "run directory not found"), (empty, "not a run directory"),
             (no_steps, "no recorded steps")]
    runner = CliRunner()
    for root, needle in cases:
        with pytest.raises(InputError, match=needle):
            write_report(root)
        result = runner.invoke(app, ["report", "--run", str(root)])
        assert result.exit_code == 2
        assert result.stderr.strip().count("\n") == 0 and needle in result.stderr
    assert not any(tmp_path.rglob("*.html"))


def test_cli_writes_the_default_report_file(run_root, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_root, copy)
    result = CliRunner().invoke(app, ["report", "--run", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / "report.html").read_text().startswith("<!DOCTYPE html>")
