"""Each method's statistic and score against a direct computation."""

import pytest
import torch

from copal.masks import Structure
from copal.methods import METHODS, Copal, Hessian, InputEnergy, LayerInput, OutputSensitivity


def _layer(seed=0, out_features=32, in_features=64, tokens=512):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g)
    # correlated inputs with uneven column scales, as in real activations
    x = torch.randn(tokens, in_features, generator=g) @ torch.randn(in_features, in_features, generator=g) * 0.3
    x = x * torch.linspace(0.1, 3.0, in_features)
    return weight, x


def _stat(kind, weight, x):
    stat = kind(tuple(weight.shape), torch.device("cpu"))
    for chunk in x.split(100):
        stat.add(LayerInput(chunk), chunk @ weight.t())
    return stat.value


def test_wanda_mask_equals_direct_computation():
    weight, x = _layer()
    mask, new_weight = METHODS["wanda"]().prune(weight, _stat(InputEnergy, weight, x), Structure(0.5))
    assert new_weight is None
    direct = weight.abs() * x.norm(dim=0)  # |W_ij|·‖X_j‖
    expected = torch.zeros_like(mask)
    expected.scatter_(1, direct.topk(32, dim=1).indices, True)
    assert torch.equal(mask, expected)


def test_copal_output_statistic_is_abs_y_times_abs_x():
    weight, x = _layer(1)
    y = x @ weight.t()
    assert torch.allclose(_stat(OutputSensitivity, weight, x), y.abs().t() @ x.abs(), rtol=1e-5)


def test_sparsegpt_reconstructs_better_than_wanda():
    weight, x = _layer(2)
    for structure in (Structure(0.5), Structure(0.5, (2, 4))):
        mask_s, weight_s = METHODS["sparsegpt"]().prune(weight, _stat(Hessian, weight, x), structure)
        mask_w, _ = METHODS["wanda"]().prune(weight, _stat(InputEnergy, weight, x), structure)
        error_s = (x @ weight.t() - x @ weight_s.t()).norm()
        error_w = (x @ weight.t() - x @ (weight * mask_w).t()).norm()
        assert error_s < error_w, structure
        assert (weight_s[~mask_s] == 0).all()
        assert ((~mask_s).sum(1) == 32).all()


def test_sparsegpt_keeps_forced_weights_pruned():
    weight, x = _layer(3)
    forced = torch.zeros_like(weight, dtype=torch.bool)
    forced[:, ::4] = True
    mask, new_weight = METHODS["sparsegpt"]().prune(weight, _stat(Hessian, weight, x), Structure(0.5), forced)
    assert not mask[forced].any() and (new_weight[forced] == 0).all()


def test_accumulated_statistic_is_independent_of_domain_order():
    weight, xa = _layer(4)
    _, xb = _layer(5)
    sa, sb = _stat(OutputSensitivity, weight, xa), _stat(OutputSensitivity, weight, xb * 7)
    copal = Copal(sensitivity="output")
    ab = copal.combine(copal.combine(None, sa), sb)
    ba = copal.combine(copal.combine(None, sb), sa)
    assert torch.equal(ab, ba)
    # normalisation gives both domains equal weight despite the 7× activation scale
    assert torch.allclose(ab.mean(), torch.tensor(2.0))


def test_layers_reading_one_input_share_their_statistic_work(llama_dir):
    """q/k/v (and gate/up) read one input tensor: an input-only statistic is
    accumulated once and shared, and each shared value equals a layer's own."""
    from copal.calibrate import BlockStatistics
    from copal.model import find_blocks, load_model, prunable_linears

    model, _ = load_model(str(llama_dir))
    block = find_blocks(model)[1][0]
    linears = prunable_linears(block)
    batch = torch.randint(0, 500, (2, 16))
    for statistic in (InputEnergy, Hessian, OutputSensitivity):
        stats = BlockStatistics(linears, statistic, torch.device("cpu"))
        with torch.no_grad():
            model(input_ids=batch)
        stats.close()
        values = stats.values()
        if statistic.input_only:
            assert stats.shares_with == {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                                         "mlp.up_proj": "mlp.gate_proj"}
            assert values["self_attn.v_proj"] is values["self_attn.q_proj"]
        else:
            assert stats.shares_with == {}
        alone = BlockStatistics({"self_attn.v_proj": linears["self_attn.v_proj"]}, statistic, torch.device("cpu"))
        with torch.no_grad():
            model(input_ids=batch)
        alone.close()
        assert torch.equal(alone.values()["self_attn.v_proj"], values["self_attn.v_proj"])


def test_sparsegpt_given_its_own_mask_reconstructs_the_same_weights():
    """The fixed-mask path (COPAL's reconstruct variant) is SparseGPT's OBS update."""
    from copal.obs import sparsegpt_prune

    weight, x = _layer(6)
    hessian = _stat(Hessian, weight, x)
    for structure in (Structure(0.5), Structure(0.5, (2, 4))):
        mask, reconstructed = sparsegpt_prune(weight, hessian, structure, None, blocksize=16)
        again, rebuilt = sparsegpt_prune(weight, hessian, structure, None, blocksize=16, keep=mask)
        assert torch.equal(again, mask) and torch.equal(rebuilt, reconstructed)


def test_copal_reconstruct_keeps_copals_mask_and_lowers_the_output_error():
    from copal.methods.copal import SensitivityAndHessian, split_hessian

    weight, x = _layer(7)
    stacked = _stat(SensitivityAndHessian, weight, x)
    sensitivity, hessian = split_hessian(stacked)
    assert torch.allclose(sensitivity, _stat(OutputSensitivity, weight, x), rtol=1e-6)
    assert torch.allclose(hessian, _stat(Hessian, weight, x), rtol=1e-6)
    for structure in (Structure(0.5), Structure(0.5, (2, 4))):
        plain, _ = Copal(sensitivity="output").prune(weight, sensitivity, structure)
        mask, rebuilt = Copal(sensitivity="output", reconstruct=True, blocksize=16).prune(weight, stacked, structure)
        assert torch.equal(mask, plain) and (rebuilt[~mask] == 0).all()
        assert (x @ (weight - rebuilt).t()).norm() < (x @ (weight * plain).t() - x @ weight.t()).norm()
    # accumulate: each part normalised by its own scale, then summed
    combined = Copal(sensitivity="output", reconstruct=True).combine(None, stacked)
    s, h = split_hessian(combined)
    assert torch.allclose(s.mean(), torch.tensor(1.0)) and torch.allclose(h.diagonal().mean(), torch.tensor(1.0))
    twice = Copal(sensitivity="output", reconstruct=True).combine(combined, stacked * 3)
    assert torch.allclose(twice, 2 * combined)


@pytest.mark.parametrize("method, regime, extra", [("sparsegpt", "reprune", {}), ("sparsegpt", "accumulate", {}),
                                                   ("copal", "accumulate", {"copal": {"sensitivity": "output", "reconstruct": True}})])
def test_sparsegpt_factorises_once_per_shared_input(tmp_path, llama_dir, corpus_dir, data_dir, monkeypatch,
                                                    method, regime, extra):
    """q/k/v and gate/up have equal Hessians, so a LLaMA block needs 4 inverse
    factorisations, not 7, and pruning them as one matrix of stacked rows (one
    factorisation, one OBS loop per input) changes no bit of the masks, weights or
    state against pruning each layer alone with its own factorisation."""
    from safetensors.torch import load_file

    from conftest import small_config
    from copal import obs
    from copal.config import build_config
    from copal.continual import ContinualRun
    from copal.methods.sparsegpt import SparseGPT
    from copal.state import StepState

    calls = []
    factorise = obs._inverse_cholesky
    monkeypatch.setattr(obs, "_inverse_cholesky", lambda *args: calls.append(args[2]) or factorise(*args))

    raw = small_config(llama_dir, corpus_dir, method=method, regime=regime, **extra)
    raw["domains"] = raw["domains"][:2]

    def run(root):
        continual = ContinualRun(build_config(raw), root, data_dir=data_dir)
        continual.run()
        return continual, {path.relative_to(root): load_file(path) for path in sorted(root.glob("steps/**/*.safetensors"))}

    def weights(continual, root):
        """Every step's weights: stored, or (accumulate) recomputed from its state."""
        dense = continual.session.execution.dense
        return {step.name: {name: state.weight(name, dense) for name in state.mask_names()}
                for step in sorted((root / "steps").iterdir()) for state in [StepState(step)]}

    shared_run, shared = run(tmp_path / "shared")
    assert len(calls) == 2 * 2 * 4  # 2 steps x 2 blocks x (qkv, o, gate/up, down)
    assert {name.rsplit(".", 1)[-1] for name in calls} == {"q_proj", "o_proj", "gate_proj", "down_proj"}
    original_get = obs.InverseFactors.get
    monkeypatch.setattr(obs.InverseFactors, "get",
                        lambda self, *args: self.clear() or original_get(self, *args))  # never reuse
    monkeypatch.setattr(SparseGPT, "stacks_rows", False)  # each layer alone
    alone_run, alone = run(tmp_path / "alone")
    assert len(calls) == 2 * 2 * 4 + 2 * 2 * 7
    assert shared.keys() == alone.keys()  # masks and state (and weights where they are stored)
    for path, tensors in shared.items():
        assert all(torch.equal(tensors[key], alone[path][key]) for key in tensors), path
    shared, alone = weights(shared_run, tmp_path / "shared"), weights(alone_run, tmp_path / "alone")
    for step, layers in shared.items():
        assert all(torch.equal(weight, alone[step][name]) for name, weight in layers.items()), step


def test_config_choices_are_the_registries_names():
    """A method, regime or state format is offered by the config (and the bench grid)
    because it is registered: the choices are derived, never listed a second time."""
    import typing

    from copal.config import RunConfig, StateOptions
    from copal.grid import Sweep
    from copal.regimes import REGIMES
    from copal.codecs import CODECS

    choices = lambda annotation: typing.get_args(annotation)  # noqa: E731
    assert choices(RunConfig.model_fields["method"].annotation) == tuple(METHODS)
    assert choices(RunConfig.model_fields["regime"].annotation) == tuple(REGIMES)
    assert choices(StateOptions.model_fields["format"].annotation) == tuple(CODECS)
    assert choices(typing.get_args(Sweep.model_fields["methods"].annotation)[0]) == tuple(METHODS)
