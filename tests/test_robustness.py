"""Robustness gaps of issue 12: SparseGPT's Cholesky retry, the N:M blocksize
rule, the recorded layer sparsity, and input errors found inside the flow."""

import logging

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import assert_one_line_error, small_config
from copal.masks import Structure
from copal.methods import Magnitude, SparseGPT
from copal.obs import sparsegpt_prune
from copal.regimes import REGIMES
from copal.step import StepPolicy

LAYER = "model.layers.0.mlp.up_proj"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def copal_warnings():
    """The copal logger's records (the CLI may have turned its propagation off)."""
    handler = _Records()
    logger = logging.getLogger("copal")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def _indefinite_hessian(cols=16, seed=0, negative=0.5):
    """X^T X with its smallest eigenvalue moved to -`negative`: a Hessian that is
    not positive definite (as round-off in an accumulated sum can leave one), so
    Cholesky fails at 1 % dampening and succeeds once the dampening outweighs it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g)
    hessian = x.t() @ x / x.shape[0]
    values, vectors = torch.linalg.eigh(hessian)
    v = vectors[:, 0]
    return hessian - (values[0] + negative) * torch.outer(v, v)


def test_sparsegpt_retries_an_indefinite_hessian_with_more_dampening(copal_warnings):
    hessian = _indefinite_hessian()
    assert torch.linalg.eigvalsh(hessian)[0] < 0
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(hessian + 0.01 * hessian.diagonal().mean() * torch.eye(16))
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    mask, new_weight = sparsegpt_prune(weight, hessian, Structure(0.5), None, layer=LAYER)
    assert torch.isfinite(new_weight).all()
    assert ((~mask).sum(1) == 8).all() and (new_weight[~mask] == 0).all()
    assert copal_warnings and all(message.startswith(f"{LAYER}: ") for message in copal_warnings)
    assert "retrying with 0.1" in copal_warnings[0]


def test_sparsegpt_fails_clearly_when_dampening_cannot_help(copal_warnings):
    hessian = torch.tensor([[1.0, 100.0], [100.0, 1.0]])  # eigenvalues 101 and -99
    weight = torch.ones(2, 2)
    with pytest.raises(torch.linalg.LinAlgError, match=f"^{LAYER}: SparseGPT cannot invert the Hessian"):
        sparsegpt_prune(weight, hessian, Structure(0.5), None, layer=LAYER)
    assert len(copal_warnings) == 3  # 0.01 → 0.1 → 1 → 10, then the error
    nan = torch.full((2, 2), float("nan"))
    with pytest.raises(torch.linalg.LinAlgError, match="NaN or infinite"):
        sparsegpt_prune(weight, nan, Structure(0.5), None)


CPU = torch.device("cpu")


def test_step_policy_names_the_layer_whose_hessian_fails():
    policy = StepPolicy(SparseGPT(), REGIMES["reprune"], Structure(0.5), None, None, None, CPU)
    with pytest.raises(torch.linalg.LinAlgError, match=f"^{LAYER}: SparseGPT cannot invert"):
        policy.prune_layer(LAYER, torch.ones(2, 2), torch.tensor([[1.0, 100.0], [100.0, 1.0]]))


@pytest.mark.parametrize("structure,blocksize,ok", [("2:4", 6, False), ("4:8", 12, False), ("4:8", 4, False),
                                                    ("2:4", 4, True), ("4:8", 64, True),
                                                    ("unstructured", 6, True)])
def test_sparsegpt_blocksize_must_hold_whole_n_m_groups(tmp_path, llama_dir, corpus_dir, structure, blocksize, ok):
    from copal.config import build_config
    from copal.errors import InputError
    from cli import app

    config = small_config(llama_dir, corpus_dir, method="sparsegpt", structure=structure,
                          sparsity=0.5, sparsegpt={"blocksize": blocksize})
    if ok:
        assert build_config(config).sparsegpt.blocksize == blocksize
        return
    with pytest.raises(InputError, match=f"sparsegpt: blocksize {blocksize} is not a multiple of"):
        build_config(config)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")], catch_exceptions=False)
    assert_one_line_error(result, "sparsegpt: blocksize", structure)
    assert not (tmp_path / "run").exists()


def test_layer_sparsity_counts_the_zeros_of_the_final_weight(tmp_path):
    """SparseGPT zeroes the weights of dead inputs; with more dead columns than a
    row prunes, the mask keeps some of those zeros, and the recorded sparsity must
    still be the layer's true fraction of zeros."""
    from copal.state import StepWriter

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 16, generator=g)
    x = torch.randn(256, 16, generator=g)
    x[:, 4:] = 0  # 12 of 16 inputs never fire
    hessian = x.t() @ x / x.shape[0]
    writer = StepWriter(tmp_path / "steps", 1)
    policy = StepPolicy(SparseGPT(blocksize=16, dampening=0.01), REGIMES["reprune"], Structure(0.5), None, None,
                        writer, CPU)
    final = policy.prune_layer(LAYER, weight, hessian)
    mask, expected = sparsegpt_prune(weight, hessian, Structure(0.5), None, blocksize=16)
    assert torch.equal(final, expected)
    assert ((~mask).sum(1) == 8).all()  # the mask itself is unchanged: 50 % per row
    assert (final[mask] == 0).any()  # … but it keeps zeros
    assert writer.layer_sparsity()[LAYER] == (final == 0).sum().item() / final.numel() == 0.75
    assert writer.overall_sparsity() == 0.75
    from copal import masks as maskio

    assert torch.equal(maskio.unpack(writer.packed_masks[LAYER], (8, 16)), mask)

    # Methods that keep the weights: W0 ⊙ mask, so zeros of W0 the mask keeps count too.
    weight[0, :12] = 0
    writer = StepWriter(tmp_path / "steps", 2)
    policy = StepPolicy(Magnitude(), REGIMES["reprune"], Structure(0.5), None, None, writer, CPU)
    final = policy.prune_layer(LAYER, weight, None)
    assert writer.layer_sparsity()[LAYER] == (final == 0).sum().item() / final.numel() == (12 + 7 * 8) / 128


def _same_stem_config(tmp_path, llama_dir, corpus_dir):
    """Two text files with the same stem: two domains named 'legal'."""
    for folder, source in (("a", "alpha"), ("b", "beta")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "legal.txt").write_text((corpus_dir / f"{source}.txt").read_text())
    config = small_config(llama_dir, corpus_dir, domains=[f"text:{tmp_path / 'a/legal.txt'}",
                                                          f"text:{tmp_path / 'b/legal.txt'}"])
    path = tmp_path / "legal.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _copal_process(args, tmp_path, prelude=""):
    import os
    import subprocess
    import sys

    env = {**os.environ, "COPAL_DATA_DIR": str(tmp_path / "arrow"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    code = f"import sys\n{prelude}\nfrom cli import main\nsys.argv[0] = 'copal'\nmain()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_two_domains_with_one_name_are_one_line_and_exit_2(tmp_path, llama_dir, corpus_dir):
    path = _same_stem_config(tmp_path, llama_dir, corpus_dir)
    result = _copal_process(["run", path, "--out", tmp_path / "run"], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"copal: error: text:{tmp_path / 'b/legal.txt'}: another domain is already named 'legal'; "
                     f"name it, e.g. legal-2=text:{tmp_path / 'b/legal.txt'}"], result.stderr
    assert not (tmp_path / "run").exists()


def test_an_input_error_inside_the_flow_is_one_line_too(tmp_path, llama_dir, corpus_dir):
    """Without preflight the same error is raised inside the Prefect flow (task
    open-run): Prefect's routine lines stay, its reports of the error do not."""
    path = _same_stem_config(tmp_path, llama_dir, corpus_dir)
    prelude = "import copal.continual\ncopal.continual.preflight = lambda *args, **kwargs: None"
    result = _copal_process(["run", path, "--out", tmp_path / "run", "-v"], tmp_path, prelude)  # -v: Prefect's lines
    assert result.returncode == 2, result.stderr
    assert "Beginning flow run" in result.stderr  # the error was found inside the flow
    assert "Traceback" not in result.stderr and "| ERROR" not in result.stderr, result.stderr
    mentions = [line for line in result.stderr.splitlines() if "legal" in line]
    assert mentions == [f"copal: error: text:{tmp_path / 'b/legal.txt'}: another domain is already named 'legal'; "
                        f"name it, e.g. legal-2=text:{tmp_path / 'b/legal.txt'}"], result.stderr


def test_prefect_reports_of_input_errors_are_dropped_and_others_kept():
    import sys

    from copal.errors import InputError
    from cli.logs import WithoutInputErrors

    def record(message, error=None):
        exc_info = None
        if error is not None:
            try:
                raise error
            except Exception:
                exc_info = sys.exc_info()
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, message, (), exc_info)

    keep = WithoutInputErrors().filter
    assert not keep(record("Task run failed with exception: InputError('x')", InputError("x")))
    assert not keep(record("Finished in state Failed('Task run encountered an exception InputError: x')"))
    assert not keep(record("Finished in state Failed('Flow run encountered an exception: InputError: x')"))
    assert keep(record("Task run failed with exception: ValueError('x')", ValueError("x")))
    assert keep(record("Finished in state Failed('Task run encountered an exception ValueError: x')"))
    assert keep(record("Beginning flow run 'x' for flow 'copal-run'"))
