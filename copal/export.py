"""A recorded step → model weights: in memory, or as a plain Hugging Face directory."""

import shutil
from pathlib import Path

from copal.atomic import check_target
from copal.rundir import RunDir
from copal.errors import InputError
from copal.rundir import check_trust
from copal.model import DenseWeights, all_prunable, load_model, set_weight_matrix
from copal.state import StepState


def load_with_step(location: str, state: StepState, dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer): the base model at `location` with a step's masks
    (and reconstructed weights, for sparsegpt) applied."""
    model, tokenizer = load_model(location, dtype, trust_remote_code)
    dense = DenseWeights(model, location)
    for name, module in all_prunable(model).items():
        set_weight_matrix(module, state.weight(name, dense))
    return model, tokenizer


def load_step_model(run_root: Path, step_id: int, trust_remote_code: bool = False):
    """(model, tokenizer) holding exactly the weights after step `step_id` of a run, its
    files checked against their recorded digests first. The run's config may ask for
    trust_remote_code; `trust_remote_code` must then say so too."""
    run_dir = RunDir(run_root).require()
    config, _ = run_dir.read_config()
    check_trust(run_dir, config, trust_remote_code)
    state = run_dir.step(step_id)
    state.verify()
    return load_with_step(config.model, state, config.dtype, config.trust_remote_code)


def export_step(run_root: Path, step_id: int, out: Path, trust_remote_code: bool = False) -> None:
    out = Path(out)
    check_target(out, "the export directory")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: exists and is not empty; export needs a new or empty directory")
    model, tokenizer = load_step_model(run_root, step_id, trust_remote_code)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed export
    try:
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        if out.exists():
            out.rmdir()
        partial.replace(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
