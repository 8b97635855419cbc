"""The device boundary, checked without a GPU: every method × regime × structure runs
two continual steps with the compute device set to a stand-in CUDA (tests/fake_cuda.py)
that fails on any operation mixing compute-side tensors with plain CPU ones, and the
masks it records are the ones a plain CPU run records (the device-dependent code paths,
e.g. the GPU's top-k selection and the state codec on the compute device, choose the
same bits on the CPU's arithmetic)."""

import hashlib

import pytest
import torch

from conftest import small_config
from copal.config import build_config
from copal.continual import ContinualRun
from copal.records import RunMetrics
from copal.rundir import RunDir
from fake_cuda import FakeCuda

CASES = [(method, regime, "unstructured") for method in ("magnitude", "wanda", "sparsegpt", "copal")
         for regime in ("sequential", "reprune", "accumulate", "joint")]
CASES += [(method, "accumulate", "2:4") for method in ("magnitude", "wanda", "sparsegpt", "copal")]
CASES += [("sparsegpt", "sequential", "4:8"), ("copal", "sequential", "2:4"),
          ("copal-reconstruct", "accumulate", "unstructured"), ("copal-loss", "accumulate", "2:4"),
          ("copal-layer", "accumulate", "unstructured")]


def _config(llama_dir, corpus_dir, method, regime, structure):
    overrides = dict(regime=regime, structure=structure, sparsity=0.5, method=method,
                     domains=[f"text:{corpus_dir / name}.txt" for name in ("alpha", "beta")],
                     calibration={"nsamples": 4, "seqlen": 32, "batch_size": 2},
                     evaluation={"seqlen": 32, "max_tokens": 256, "batch_size": 4})
    if method == "copal-reconstruct":
        overrides.update(method="copal", copal={"sensitivity": "output", "reconstruct": True})
    elif method == "copal-loss":
        overrides.update(method="copal", copal={"sensitivity": "loss"})
    elif method == "copal-layer":
        overrides.update(method="copal", mask_scope="layer")
    # SparseGPT's pass solves column groups at once on a CUDA device (solve: auto), the loop
    # on a CPU: the same arithmetic in another order, whose rounding can flip a mask bit
    # (the CPU's BLAS kernels decide, so an AMD and an Intel machine differ). Both runs
    # name one solve so that they compute alike: the sparsegpt cases the batched one, on
    # the CPU too, the copal cases (whose refit carries any rounding into later blocks'
    # masks) the loop.
    if overrides["method"] == "sparsegpt":
        overrides["sparsegpt"] = {"solve": "batched"}
    elif overrides["method"] == "copal" and "copal" not in overrides:
        overrides["sparsegpt"] = {"solve": "loop"}
    return build_config(small_config(llama_dir, corpus_dir, **overrides), "test")


def _run(config, root, data_dir) -> tuple[str, RunMetrics]:
    """Two steps; (SHA-256 of every step's masks, the run's metrics)."""
    run = ContinualRun(config, root, data_dir=data_dir)
    metrics = run.run()
    digest = hashlib.sha256()
    for state in run.dir.lineage():
        for name in state.mask_names():
            digest.update(name.encode() + state.mask(name).numpy().tobytes())
    return digest.hexdigest(), metrics


@pytest.mark.parametrize("method,regime,structure", CASES)
def test_a_step_on_the_compute_device_mixes_no_devices(tmp_path, data_dir, llama_dir, corpus_dir, monkeypatch,
                                                       method, regime, structure):
    config = _config(llama_dir, corpus_dir, method, regime, structure)
    on_cpu, cpu_metrics = _run(config, tmp_path / "cpu", data_dir)
    monkeypatch.setattr("copal.session.resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stand-in")  # the step's record
    mode = FakeCuda()
    with mode:
        on_device, device_metrics = _run(config, tmp_path / "cuda", data_dir)
    assert mode.crossings > 0  # the run did compute on the stand-in device
    assert on_device == on_cpu
    flat = [ppl for row in device_metrics.ppl for ppl in row]
    assert RunDir(tmp_path / "cuda").step(2).record.environment["device"] == "cuda stand-in"
    assert flat == pytest.approx([ppl for row in cpu_metrics.ppl for ppl in row], rel=1e-5)


def test_the_stand_in_device_catches_a_mix():
    with FakeCuda():
        on_device = torch.ones(3, device="cuda")
        assert on_device.device.type == "cuda" and on_device.is_cuda
        assert (on_device + 1).device.type == "cuda"  # a Python scalar mixes freely
        assert (on_device * torch.tensor(2.0)).device.type == "cuda"  # so does a 0-dim CPU tensor
        with pytest.raises(RuntimeError, match="mixed"):
            on_device * torch.ones(3)
        with pytest.raises(TypeError):
            on_device.numpy()
        back = on_device.cpu()
        assert back.device.type == "cpu" and torch.equal(back * torch.ones(3), torch.ones(3))
        into = torch.zeros(3)
        into.copy_(on_device)  # copies cross, as on CUDA
        assert into.device.type == "cpu"


@pytest.mark.parametrize("count", [1, 7, 8, 9, 4099])
def test_bits_pack_the_same_on_the_compute_device(count):
    from copal.masks import pack
    from copal.codecs import _pack_codes

    bits = torch.rand(count, generator=torch.Generator().manual_seed(count)) > 0.5
    codes = {levels: torch.randint(0, levels, (count,), dtype=torch.uint8) for levels in (2, 6, 8, 16, 256)}
    with FakeCuda():
        on_device = pack(bits.to("cuda")).cpu()
        codes_on_device = {levels: _pack_codes(value.to("cuda"), levels).cpu() for levels, value in codes.items()}
    assert torch.equal(on_device, pack(bits))
    for levels, value in codes.items():
        assert torch.equal(codes_on_device[levels], _pack_codes(value, levels)), levels
