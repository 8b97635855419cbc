"""copal.refit: the kept weights' refit on a fixed mask against an exact per-row
least-squares solve, written here independently (one torch.linalg.solve per row
on its kept sub-Hessian)."""

import pytest
import torch

from copal.masks import Structure, select_mask
from copal.refit import PCGOptions, damped_hessian, reconstruction_error, refit


def _layer(rows=24, cols=48, tokens=400, seed=0):
    """W0, H = XᵀX of correlated inputs with uneven scales (as activations are)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=generator) / cols ** 0.5
    scales = torch.logspace(0, 1, cols)[torch.randperm(cols, generator=generator)]
    x = (torch.randn(tokens, cols, generator=generator) @ mixing) * scales
    weight = torch.randn(rows, cols, generator=generator)
    return weight, x.t() @ x


def _masks(weight, hessian):
    score = weight.abs() * hessian.diagonal().sqrt()
    return {"u50": select_mask(score, Structure(0.5)), "2:4": select_mask(score, Structure(0.5, (2, 4))),
            "u70": select_mask(score, Structure(0.7))}


def _exact_per_row(weight, hessian, keep):
    """argmin over ŵ_K of (ŵ − w0)ᵀ H (ŵ − w0), ŵ_P = 0: H_KK ŵ_K = (H w0)_K, row by row, float64."""
    h, w0 = hessian.double(), weight.double()
    result = torch.zeros_like(w0)
    for row in range(w0.shape[0]):
        kept = keep[row].nonzero().squeeze(1)
        result[row, kept] = torch.linalg.solve(h[kept][:, kept], (h @ w0[row])[kept])
    return result


def _relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("structure", ["u50", "2:4", "u70"])
@pytest.mark.parametrize("preconditioner", ["jacobi", "block"])
@pytest.mark.parametrize("warm_start", ["obs", "masked"])
def test_pcg_agrees_with_the_exact_per_row_solve(structure, preconditioner, warm_start):
    weight, hessian = _layer()
    keep = _masks(weight, hessian)[structure]
    exact = _exact_per_row(weight, hessian, keep)
    options = PCGOptions(iterations=200, tolerance=1e-7, preconditioner=preconditioner, block_size=8,
                         warm_start=warm_start)
    fitted = refit(weight, hessian, keep, "pcg", dampening=0.0, options=options)
    assert _relative(fitted, exact) < 1e-4
    assert torch.equal(fitted[~keep], torch.zeros(int((~keep).sum())))
    assert _relative(refit(weight, hessian, keep, "exact", dampening=0.0), exact) < 1e-6


def test_dampening_is_sparsegpt_s_and_enters_every_solver():
    weight, hessian = _layer(seed=1)
    keep = _masks(weight, hessian)["u50"]
    damped = damped_hessian(hessian, 0.01)
    assert torch.allclose(damped - hessian, 0.01 * hessian.diagonal().mean() * torch.eye(hessian.shape[0]))
    exact = _exact_per_row(weight, damped, keep)
    assert _relative(refit(weight, hessian, keep, "exact", dampening=0.01), exact) < 1e-6
    pcg = refit(weight, hessian, keep, "pcg", dampening=0.01, options=PCGOptions(iterations=200, tolerance=1e-7))
    assert _relative(pcg, exact) < 1e-4
    assert _relative(pcg, _exact_per_row(weight, hessian, keep)) > 1e-4  # the dampening changed the answer


@pytest.mark.parametrize("structure", ["u50", "2:4", "u70"])
def test_pcg_is_no_worse_than_obs_and_obs_no_worse_than_no_refit(structure):
    weight, hessian = _layer(rows=32, cols=64, seed=2)
    keep = _masks(weight, hessian)[structure]
    errors = {}
    for solver in ("obs", "pcg"):
        fitted = refit(weight, hessian, keep, solver, dampening=0.01, options=PCGOptions(iterations=10))
        assert torch.equal(fitted[~keep], torch.zeros(int((~keep).sum())))
        errors[solver] = reconstruction_error(fitted, hessian, weight)
    errors["none"] = reconstruction_error(weight * keep, hessian, weight)
    assert errors["pcg"].sum() <= errors["obs"].sum() < errors["none"].sum()
    assert bool((errors["pcg"] <= errors["obs"] * (1 + 1e-6)).all())  # row by row too: CG only descends


def test_never_firing_inputs_keep_w0_when_kept_and_zero_when_pruned():
    weight, hessian = _layer(seed=3)
    hessian[5, :] = hessian[:, 5] = 0
    keep = _masks(weight, hessian)["2:4"]
    for solver in ("obs", "pcg", "exact"):
        fitted = refit(weight, hessian, keep, solver)
        assert torch.equal(fitted[:, 5], weight[:, 5] * keep[:, 5]), solver


def test_refit_is_deterministic_and_float32():
    weight, hessian = _layer(seed=4)
    keep = _masks(weight, hessian)["u50"]
    options = PCGOptions(iterations=15, preconditioner="block", block_size=16)
    first = refit(weight, hessian, keep, "pcg", options=options)
    assert first.dtype == torch.float32
    assert torch.equal(first, refit(weight.clone(), hessian.clone(), keep.clone(), "pcg", options=options))


def test_pcg_stops_at_its_tolerance_and_iteration_budget():
    weight, hessian = _layer(seed=5)
    keep = _masks(weight, hessian)["u50"]
    start = refit(weight, hessian, keep, "pcg", options=PCGOptions(iterations=0, warm_start="masked"))
    assert torch.equal(start, weight * keep)
    loose = refit(weight, hessian, keep, "pcg", options=PCGOptions(iterations=200, tolerance=0.5))
    tight = refit(weight, hessian, keep, "pcg", options=PCGOptions(iterations=200, tolerance=1e-7))
    exact = refit(weight, hessian, keep, "exact")
    assert _relative(tight, exact) < _relative(loose, exact)


def test_bad_options_are_one_line_errors():
    weight, hessian = _layer()
    keep = _masks(weight, hessian)["u50"]
    with pytest.raises(ValueError, match="refit solver 'lsq'"):
        refit(weight, hessian, keep, "lsq")
    with pytest.raises(ValueError, match="preconditioner 'ilu'"):
        PCGOptions(preconditioner="ilu")
    with pytest.raises(ValueError, match="warm start"):
        PCGOptions(warm_start="zero")


def test_exact_solver_handles_rows_with_unequal_kept_counts():
    weight, hessian = _layer(seed=6)
    keep = _masks(weight, hessian)["u50"]
    keep[0, :] = True
    keep[1, :] = False
    keep[2, :3] = False
    exact = _exact_per_row(weight, hessian, keep)
    fitted = refit(weight, hessian, keep, "exact", dampening=0.0)
    assert _relative(fitted, exact) < 1e-6
    assert torch.equal(fitted[1], torch.zeros(weight.shape[1]))


def test_copal_reconstruct_with_pcg_keeps_the_mask_and_fits_closer():
    """COPAL's `reconstruct` variant with `refit: pcg`: the same mask as with the OBS
    update (the refit never chooses), and kept weights at least as close to W0's
    outputs on the calibration inputs."""
    from copal.methods.copal import Copal

    weight, hessian = _layer(seed=3)
    sensitivity = torch.rand(weight.shape, generator=torch.Generator().manual_seed(4))
    stacked = torch.cat([sensitivity, hessian])  # SensitivityAndHessian's layout: S over H
    for structure in (Structure(0.5), Structure(0.5, (2, 4))):
        obs_keep, obs_weight = Copal(sensitivity="output", reconstruct=True).prune(weight, stacked, structure)
        pcg_keep, pcg_weight = Copal(sensitivity="output", reconstruct=True, refit="pcg").prune(weight, stacked, structure)
        assert torch.equal(obs_keep, pcg_keep)
        assert (pcg_weight[~pcg_keep] == 0).all()
        damped = damped_hessian(hessian, 0.01)
        assert (reconstruction_error(pcg_weight, damped, weight).sum()
                <= reconstruction_error(obs_weight, damped, weight).sum())


def test_refit_pcg_needs_reconstruct():
    from copal.methods.copal import CopalOptions

    assert CopalOptions(sensitivity="output", reconstruct=True, refit="pcg").rebuilt_by == "pcg"
    assert CopalOptions(sensitivity="output", reconstruct=True).rebuilt_by == "obs"
    assert CopalOptions().rebuilt_by == "pcg" and CopalOptions(sensitivity="output").rebuilt_by == ""
    with pytest.raises(ValueError, match="needs reconstruct: true"):
        CopalOptions(sensitivity="output", refit="pcg")
    with pytest.raises(ValueError, match="mask: admm .* needs sensitivity: hessian"):
        CopalOptions(sensitivity="output", mask="admm")


def test_an_unset_mask_is_admm_for_the_hessian_and_obs_for_the_others():
    """ADMM is the default's mask; an unset mask must not make `sensitivity: output`
    or `loss` invalid, and a config's dump keeps the mask it resolved to."""
    from copal.methods import Copal
    from copal.methods.copal import CopalOptions

    assert CopalOptions().mask == "admm" and CopalOptions(mask=None).mask == "admm"
    assert CopalOptions(sensitivity="output").mask == CopalOptions(sensitivity="loss").mask == "obs"
    assert CopalOptions(mask="obs").mask == "obs"
    assert CopalOptions(**CopalOptions().model_dump()) == CopalOptions()
    assert Copal().mask == "admm" and Copal().second_order is None
    assert Copal(mask="obs").second_order is not None and Copal(sensitivity="output").mask == "obs"


@pytest.mark.parametrize("structure", [Structure(0.5), Structure(0.5, (2, 4))])
def test_sparsegpt_refit_keeps_its_mask_lowers_the_error_and_recomputes_bit_for_bit(structure):
    """`sparsegpt: {refit: pcg}`: SparseGPT's own mask, its update refit towards the
    least-squares optimum (a lower layer objective than the OBS update alone), and
    `reweight` (what a step that stores no weights runs) gives the same bits."""
    from copal.methods import SparseGPT

    weight, hessian = _layer(rows=32, cols=64)
    obs_keep, obs_weight = SparseGPT(blocksize=16).prune(weight, hessian, structure)
    method = SparseGPT(blocksize=16, refit="pcg", refit_iterations=20)
    keep, refit_weight = method.prune(weight, hessian, structure)
    assert torch.equal(keep, obs_keep) and (refit_weight[~keep] == 0).all()
    error = reconstruction_error(refit_weight, hessian, weight).sum()
    exact = reconstruction_error(refit(weight, hessian, keep, "exact"), hessian, weight).sum()
    assert error < reconstruction_error(obs_weight, hessian, weight).sum() and error <= 1.01 * exact
    assert torch.equal(method.reweight(weight, hessian, keep), refit_weight)
    assert method.options()["refit_iterations"] == 20


@pytest.mark.parametrize("name", ["wanda", "magnitude"])
@pytest.mark.parametrize("structure", [Structure(0.5), Structure(0.5, (2, 4))])
def test_wanda_and_magnitude_refit_keeps_their_mask_and_fits_towards_the_exact_solve(name, structure):
    """`wanda/magnitude: {refit: obs | pcg}`: the method's own mask (Wanda's from the
    Hessian's diagonal, its Σx²), the kept weights refit on it; none changes nothing."""
    from copal.methods import METHODS
    from copal.methods.wanda import InputEnergy

    weight, hessian = _layer(rows=32, cols=64)
    plain = METHODS[name]()
    assert plain.statistic is (InputEnergy if name == "wanda" else None)
    own_stat = hessian.diagonal().clone() if name == "wanda" else None
    plain_keep, unchanged = plain.prune(weight, own_stat, structure)
    assert unchanged is None
    errors = {}
    for solver in ("obs", "pcg"):
        method = METHODS[name](refit=solver, refit_iterations=20, blocksize=16)
        assert method.symmetric_state  # it accumulates H now, stored as state.hessian says
        keep, fitted = method.prune(weight, hessian, structure)
        assert torch.equal(keep, plain_keep) and (fitted[~keep] == 0).all()
        assert torch.equal(METHODS[name](**method.options()).reweight(weight, hessian, keep), fitted)
        errors[solver] = reconstruction_error(fitted, hessian, weight).sum()
    exact = reconstruction_error(refit(weight, hessian, plain_keep, "exact"), hessian, weight).sum()
    masked = reconstruction_error(weight * plain_keep, hessian, weight).sum()
    assert errors["pcg"] <= 1.01 * exact and errors["pcg"] < errors["obs"] < masked
    with pytest.raises(ValueError, match="refit"):
        METHODS[name](refit="exact")


@pytest.mark.parametrize("structure", [Structure(0.5), Structure(0.5, (2, 4)), Structure(0.7), "given"])
def test_sparsegpt_batched_solve_is_the_column_loop_in_another_order(structure):
    """`sparsegpt.solve: batched` (every row's triangular system of a column group at once,
    CUDA's default) gives the column loop's masks, and its weights up to float32 rounding."""
    from copal.obs import resolved_solve, sparsegpt_prune

    weight, hessian = _layer(rows=40, cols=96, seed=3)
    keep = _masks(weight, hessian)["u50"] if structure == "given" else None
    structure = Structure(0.5) if structure == "given" else structure
    loop = sparsegpt_prune(weight, hessian, structure, None, blocksize=32, keep=keep)
    batched = sparsegpt_prune(weight, hessian, structure, None, blocksize=32, keep=keep, solve="batched")
    assert torch.equal(loop[0], batched[0])
    assert _relative(batched[1], loop[1]) < 1e-5 and (batched[1][~batched[0]] == 0).all()
    assert resolved_solve("auto", torch.device("cpu")) == "loop" and resolved_solve("auto", "cuda:0") == "batched"


@pytest.mark.parametrize("structure", [Structure(0.5), Structure(0.5, (2, 4)), Structure(0.7)])
def test_admm_keeps_the_structure_and_fits_better_than_sparsegpt_refit_exactly(structure):
    """copal.admm: a mask of the asked structure, zeros where it prunes, the same bits
    twice, and on correlated inputs a better mask than SparseGPT's: each refit to its
    least-squares optimum (as copal refits ADMM's), ADMM's has the lower layer objective."""
    from copal.admm import admm_prune
    from copal.methods import SparseGPT

    weight, hessian = _layer(rows=64, cols=128, tokens=2000)
    keep, fitted = admm_prune(weight, hessian, structure)
    again = admm_prune(weight, hessian, structure)
    assert torch.equal(keep, again[0]) and torch.equal(fitted, again[1]) and (fitted[~keep] == 0).all()
    if structure.n_m:
        assert (keep.reshape(64, -1, 4).sum(-1) == 2).all()
    else:
        assert (keep.sum(1) == round(128 * (1 - structure.sparsity))).all()
    sparsegpt_keep, _ = SparseGPT(blocksize=32).prune(weight, hessian, structure)
    best_for_sparsegpt = reconstruction_error(refit(weight, hessian, sparsegpt_keep, "exact"), hessian, weight).sum()
    best_for_admm = reconstruction_error(refit(weight, hessian, keep, "exact"), hessian, weight).sum()
    assert best_for_admm < 0.99 * best_for_sparsegpt


@pytest.mark.parametrize("structure", [Structure(0.5), Structure(0.5, (2, 4)), Structure(0.7, scope="layer")])
def test_the_default_refits_from_admm_s_weights_and_recomputes_them_bit_for_bit(structure):
    """copal's default refits ADMM's mask from ADMM's own sparse weights: in the same
    iterations closer to the least-squares optimum than from W0 ⊙ M. `reweight` runs
    ADMM again under the step's structure and gives the same bits; a layer pruned with
    others, rows stacked (q/k/v) under a profile's uneven count, gets its rows back alone."""
    from copal.methods import Copal

    weight, hessian = _layer(rows=48, cols=64, tokens=1000)
    method = Copal()
    assert method.mask == "admm" and method.refit_start == "admm" and method.pcg.iterations == 4
    keep, fitted = method.prune(weight, hessian, structure)
    assert (fitted[~keep] == 0).all()
    assert torch.equal(method.reweight(weight, hessian, keep, structure=structure), fitted)
    exact = reconstruction_error(refit(weight, hessian, keep, "exact"), hessian, weight).sum()
    assert reconstruction_error(fitted, hessian, weight).sum() < 1.001 * exact
    _, one_step = Copal(refit_iterations=1).prune(weight, hessian, structure)
    masked = refit(weight, hessian, keep, "pcg", options=PCGOptions(iterations=1, warm_start="masked"))
    assert reconstruction_error(one_step, hessian, weight).sum() - exact < 0.5 * (
        reconstruction_error(masked, hessian, weight).sum() - exact)
    if structure.scope == "row" and structure.n_m is None:
        uneven = Structure(0.5, pruned=48 * 32 + 7)  # the first 7 rows prune one more
        keep, fitted = method.prune(weight, hessian, uneven)
        step = Structure(0.5)  # what a step records: the profile's counts are in the mask
        for rows in (slice(0, 8), slice(8, 48)):
            assert torch.equal(method.reweight(weight[rows], hessian, keep[rows], structure=step), fitted[rows])
    with pytest.raises(ValueError, match="structure"):
        method.reweight(weight, hessian, keep)


def test_older_step_records_recompute_as_they_were_made():
    """Step records from before `refit_start` name mask: admm without it: their weights
    were refit from W0 ⊙ M, and are recomputed so. Records from before `mask` (the
    hessian sensitivity with SparseGPT's mask) recompute SparseGPT's update and refit."""
    from copal.methods import Copal, SparseGPT

    weight, hessian = _layer()
    old = {key: value for key, value in Copal(refit_iterations=8).options().items() if key != "refit_start"}
    method = Copal.from_options(old)
    assert method.refit_start == "masked" and Copal.from_options(Copal().options()).refit_start == "admm"
    keep, fitted = method.prune(weight, hessian, Structure(0.5))
    expected = refit(weight, hessian, keep, "pcg", options=PCGOptions(iterations=8, warm_start="masked"))
    assert torch.equal(fitted, expected) and torch.equal(method.reweight(weight, hessian, keep), expected)
    older = {key: value for key, value in old.items() if key not in ("mask", "admm_iterations")}
    method = Copal.from_options(older)
    assert method.mask == "obs"
    sparsegpt = SparseGPT(refit="pcg", refit_iterations=8)
    assert torch.equal(method.reweight(weight, hessian, keep), sparsegpt.reweight(weight, hessian, keep))
