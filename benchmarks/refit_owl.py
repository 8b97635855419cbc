"""Refit, OWL and compact Hessians on the reference model (issue 20, items 1-3).

Three measurements, written to --out (JSON) and printed as markdown tables:

* `reconstruction` — every prunable layer's H = XᵀX from the dense model on one
  domain's calibration batches (forward hooks); each layer pruned at 50 % and 2:4
  with the wanda score (|W| · √diag H); the layer-wise error ‖X(Ŵ − W0)‖² /
  ‖X W0‖² of: no refit (W0 ⊙ M), obs, pcg (k iterations, warm-started from obs
  or from W0 ⊙ M, Jacobi or block preconditioner) and the exact per-row solve
  (copal.refit), summed over layers, with each solver's seconds.
* `perplexity` — sequential layer-wise passes (copal.calibrate.prune_layerwise,
  each block's H from the already-pruned blocks' outputs), wanda or SparseGPT
  masks, uniform or OWL profile (copal.owl, from the dense pass's Σx²), each
  with a refit; PPL on the held-out windows of --eval-domains.
* `hessian_formats` — H of each distinct layer input stored as its symmetric
  half in float16 with one scale, int8 with a scale per row, or low rank +
  diagonal (rank r eigenvectors and values, diagonal exact): bytes against
  float32, ‖Ĥ − H‖/‖H‖, agreement of SparseGPT's masks chosen from Ĥ with
  those from H, and the objective (under the true H) of the pcg refit from Ĥ
  over that from H (wanda masks).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/refit_owl.py \\
        [--nsamples 64 --seqlen 256] [--threads 1] [--out reports/refit_owl.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from copal import metrics  # noqa: E402
from copal.admm import admm_prune  # noqa: E402
from copal.blocks import ResidentBlocks  # noqa: E402
from copal.calibrate import prune_layerwise  # noqa: E402
from copal.data import ingest  # noqa: E402
from copal.windows import calibration_samples, evaluation_windows  # noqa: E402
from copal.masks import Structure, select_mask  # noqa: E402
from copal.methods import Hessian  # noqa: E402
from copal.obs import sparsegpt_prune  # noqa: E402
from copal.model import all_prunable, find_blocks, load_model, set_weight_matrix, weight_matrix  # noqa: E402
from copal.owl import check_structure, layer_mask, owl_profile  # noqa: E402
from copal.refit import PCGOptions, reconstruction_error, refit  # noqa: E402

STRUCTURES = {"50%": Structure(0.5), "2:4": Structure(0.5, (2, 4)), "70%": Structure(0.7)}
DAMPENING = 0.01


def dense_hessians(model, batches) -> dict[str, torch.Tensor]:
    """H = Σ x xᵀ of every prunable layer's input in the dense model (layers reading
    one input tensor share one H object)."""
    sums, last = {}, {}

    def hook(name):
        def add(module, args, output):
            x = args[0]
            if last.get("x") is x:
                sums[name] = sums[last["name"]]
                return
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            if name not in sums:
                sums[name] = torch.zeros(flat.shape[1], flat.shape[1])
            sums[name].addmm_(flat.t(), flat)
            last.update(x=x, name=name)
        return add

    handles = [module.register_forward_hook(hook(name)) for name, module in all_prunable(model).items()]
    with torch.no_grad():
        for batch in batches:
            last.clear()
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return sums


def wanda_mask(weight, hessian, structure):
    return select_mask(weight.abs() * hessian.diagonal().clamp(min=0).sqrt()[None, :], structure)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


REFITS = {"none": None, "obs": ("obs", PCGOptions()),
          **{f"pcg{k}": ("pcg", PCGOptions(iterations=k, tolerance=0)) for k in (5, 10, 20, 50)},
          "pcg20-masked": ("pcg", PCGOptions(iterations=20, tolerance=0, warm_start="masked")),
          "pcg100-masked": ("pcg", PCGOptions(iterations=100, tolerance=0, warm_start="masked")),
          "pcg20-block": ("pcg", PCGOptions(iterations=20, tolerance=0, preconditioner="block", block_size=32)),
          "exact": ("exact", PCGOptions())}


def reconstruction(weights, hessians) -> dict:
    """Σ over layers of ‖X(Ŵ − W0)‖² / Σ ‖X W0‖² per structure and refit, and seconds."""
    results = {}
    for label in ("50%", "2:4"):
        structure = STRUCTURES[label]
        errors = {name: 0.0 for name in REFITS}
        seconds = {name: 0.0 for name in REFITS}
        gap_to_exact = {name: [] for name in REFITS}
        dense = 0.0
        for layer, weight in weights.items():
            hessian = hessians[layer]
            keep = wanda_mask(weight, hessian, structure)
            dense += float(reconstruction_error(torch.zeros_like(weight), hessian, weight).sum())
            layer_errors = {}
            for name, setting in REFITS.items():
                if setting is None:
                    fitted, spent = weight * keep, 0.0
                else:
                    fitted, spent = timed(refit, weight, hessian, keep, setting[0], DAMPENING, setting[1])
                    assert bool((fitted[~keep] == 0).all())
                layer_errors[name] = float(reconstruction_error(fitted, hessian, weight).sum())
                errors[name] += layer_errors[name]
                seconds[name] += spent
            for name in REFITS:
                gap_to_exact[name].append(layer_errors[name] / layer_errors["exact"] - 1)
        results[label] = {name: {"relative_error": errors[name] / dense, "seconds": seconds[name],
                                 "max_layer_gap_to_exact": max(gap_to_exact[name])} for name in REFITS}
        print(f"\n### reconstruction, wanda mask {label}\n\n| refit | Σ‖X(Ŵ−W0)‖² / Σ‖XW0‖² | vs exact | "
              f"worst layer vs exact | seconds (all layers) |\n|---|---|---|---|---|")
        for name, row in results[label].items():
            print(f"| {name} | {row['relative_error']:.5f} | {row['relative_error'] / results[label]['exact']['relative_error']:.4f}× "
                  f"| +{100 * row['max_layer_gap_to_exact']:.2f} % | {row['seconds']:.2f} |")
    return results


class Policy:
    """copal.calibrate's LayerPolicy for one cell: a mask (wanda or SparseGPT's,
    under the uniform structure or OWL's counts), then a refit."""

    def __init__(self, dense, structure, mask_method, refit_setting, profile=None):
        self.dense, self.structure, self.mask_method = dense, structure, mask_method
        self.refit_setting, self.profile = refit_setting, profile
        self.seconds = 0.0

    def base_weight(self, name):
        return self.dense[name]

    def prune_layer(self, name, base, hessian):
        start = time.perf_counter()
        weight = base.float()
        start_weight = None  # the mask method's own weights: the pcg refit's warm start
        if self.mask_method == "sparsegpt":
            keep, obs_weight = sparsegpt_prune(weight, hessian, self.structure, None, 128, DAMPENING, name)
        elif self.mask_method == "admm":
            keep, obs_weight = admm_prune(weight, hessian, self.structure, DAMPENING)
            start_weight = obs_weight
        elif self.profile is not None:
            keep = layer_mask(weight.abs() * hessian.diagonal().clamp(min=0).sqrt()[None, :], self.profile.pruned[name])
        else:
            keep = wanda_mask(weight, hessian, self.structure)
        if self.refit_setting is None:
            new = obs_weight if self.mask_method in ("sparsegpt", "admm") else weight * keep
        else:
            new = refit(weight, hessian, keep, self.refit_setting[0], DAMPENING, self.refit_setting[1], layer=name,
                        start=start_weight)
        self.seconds += time.perf_counter() - start
        return new.to(base.dtype)

    def prune_layers(self, names, bases, fresh):
        return [self.prune_layer(name, base, hessian) for name, base, hessian in zip(names, bases, fresh)]

    def finish_block(self, index):
        pass


CELLS = [  # (structure, mask, profile, refit)
    ("50%", "wanda", "uniform", "none"), ("50%", "wanda", "uniform", "obs"), ("50%", "wanda", "uniform", "pcg20"),
    ("50%", "wanda", "uniform", "exact"), ("50%", "wanda", "owl", "none"), ("50%", "wanda", "owl", "pcg20"),
    ("50%", "sparsegpt", "uniform", "none"), ("50%", "sparsegpt", "uniform", "pcg20"),
    ("2:4", "wanda", "uniform", "none"), ("2:4", "wanda", "uniform", "obs"), ("2:4", "wanda", "uniform", "pcg20"),
    ("2:4", "wanda", "uniform", "exact"), ("2:4", "sparsegpt", "uniform", "none"), ("2:4", "sparsegpt", "uniform", "pcg20"),
    ("70%", "wanda", "uniform", "none"), ("70%", "wanda", "uniform", "pcg20"), ("70%", "wanda", "owl", "none"),
    ("70%", "wanda", "owl", "pcg20"), ("70%", "sparsegpt", "uniform", "none"), ("70%", "sparsegpt", "owl", "none"),
    # ADMM's mask and weights (copal.admm), as they are and refit on their support, beside SparseGPT + the same refit
    ("50%", "admm", "uniform", "none"), ("50%", "admm", "uniform", "pcg10"), ("50%", "sparsegpt", "uniform", "pcg10"),
    ("2:4", "admm", "uniform", "none"), ("2:4", "admm", "uniform", "pcg10"), ("2:4", "sparsegpt", "uniform", "pcg10"),
    ("70%", "admm", "uniform", "none"), ("70%", "admm", "uniform", "pcg10"), ("70%", "sparsegpt", "uniform", "pcg10"),
    ("70%", "sparsegpt", "owl", "pcg10"),
]


def owl_for(model, hessians, structure, lam, m, layer_mean):
    check_structure(structure)
    prefix, blocks = find_blocks(model)
    grouped = {}
    for name, module in all_prunable(model).items():
        block = ".".join(name.split(".")[: len(prefix.split(".")) + 1])
        grouped.setdefault(block, {})[name] = (weight_matrix(module).detach().float(), hessians[name].diagonal())
    return owl_profile(grouped, structure.sparsity, lam, m, layer_mean)


def perplexity_cells(model, dense, hessians, batches, windows, args) -> dict:
    results = {"dense": {domain: metrics.perplexity(model, w, torch.device("cpu"), 8)[0] for domain, w in windows.items()}}
    print(f"\n### perplexity ({', '.join(windows)}; wanda or SparseGPT masks; OWL λ={args.owl_lambda}, M={args.owl_m}"
          f"{', layer mean' if args.owl_layer_mean else ''})"
          f"\n\n| structure | mask | profile | refit | " + " | ".join(windows) + " | mean | prune s |\n"
          + "|---" * (6 + len(windows)) + "|")
    print("| dense | | | | " + " | ".join(f"{v:.2f}" for v in results["dense"].values())
          + f" | {sum(results['dense'].values()) / len(windows):.2f} | |")
    profiles = {}
    chosen = set(filter(None, args.cells.split(",")))
    unknown = chosen - {"/".join(cell) for cell in CELLS}
    if unknown:
        sys.exit(f"--cells: {', '.join(sorted(unknown))} not among the cells this script knows")
    for label, mask, profile_name, refit_name in CELLS:
        if chosen and f"{label}/{mask}/{profile_name}/{refit_name}" not in chosen:
            continue
        structure = STRUCTURES[label]
        if profile_name == "owl" and label not in profiles:
            profiles[label] = owl_for(model, hessians, structure, args.owl_lambda, args.owl_m, args.owl_layer_mean)
        if profile_name == "owl" and mask == "sparsegpt":
            policy = OWLSparseGPT(dense, profiles[label], REFITS[refit_name])
        else:
            policy = Policy(dense, structure, mask, REFITS[refit_name], profiles.get(label) if profile_name == "owl" else None)
        prune_layerwise(model, batches, Hessian, policy, torch.device("cpu"), ResidentBlocks(model))
        pruned = sum(int((weight_matrix(m) == 0).sum()) for m in all_prunable(model).values())
        total = sum(weight_matrix(m).numel() for m in all_prunable(model).values())
        ppl = {domain: metrics.perplexity(model, w, torch.device("cpu"), 8)[0] for domain, w in windows.items()}
        key = f"{label}/{mask}/{profile_name}/{refit_name}"
        results[key] = {"ppl": ppl, "mean": sum(ppl.values()) / len(ppl), "prune_seconds": policy.seconds,
                        "sparsity": pruned / total}
        print(f"| {label} | {mask} | {profile_name} | {refit_name} | " + " | ".join(f"{v:.2f}" for v in ppl.values())
              + f" | {results[key]['mean']:.2f} | {policy.seconds:.1f} |", flush=True)
        for name, module in all_prunable(model).items():
            set_weight_matrix(module, dense[name])
    for label, profile in profiles.items():
        results[f"owl_{label}"] = {"ratios": profile.ratios, "block_sparsity": profile.block_sparsity,
                                   "average": profile.average()}
    return results


class OWLSparseGPT(Policy):
    """SparseGPT (mask and OBS update) at the sparsity OWL gives each layer."""

    def __init__(self, dense, profile, refit_setting):
        super().__init__(dense, None, "sparsegpt", refit_setting)
        self.owl = profile

    def prune_layer(self, name, base, hessian):
        self.structure = Structure(self.owl.sparsity(name))
        return super().prune_layer(name, base, hessian)


# ---------------------------------------------------------------- Hessian formats

def _symmetric(upper: torch.Tensor) -> torch.Tensor:
    return upper + upper.triu(1).t()


def fp16_scaled(h):
    scale = h.abs().max()
    half = (h.triu() / scale).half()
    n = h.shape[0]
    return _symmetric(half.float() * scale), n * (n + 1) + 4  # the half's 2-byte values + one float32 scale


def int8_rows(h):
    upper = h.triu()
    scale = upper.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    codes = torch.round(upper / scale[:, None]).to(torch.int8)
    n = h.shape[0]
    return _symmetric(codes.float() * scale[:, None]), n * (n + 1) // 2 + 4 * n


def low_rank_diagonal(rank):
    def encode(h):
        values, vectors = torch.linalg.eigh(h.double())
        top_values, top_vectors = values[-rank:], vectors[:, -rank:]
        approx = (top_vectors * top_values) @ top_vectors.t()
        diagonal = h.double().diagonal() - approx.diagonal()
        n = h.shape[0]
        return (approx + torch.diag(diagonal)).float(), 4 * (n * rank + rank + n)
    return encode


def on_correlation(encode):
    """`encode` applied to C = D^-½ H D^-½ (entries in [-1, 1]), the diagonal D kept in float32."""
    def encoded(h):
        root = h.diagonal().clamp(min=torch.finfo(torch.float32).tiny).sqrt()
        decoded, size = encode(h / root[:, None] / root[None, :])
        return decoded * root[:, None] * root[None, :], size + 4 * h.shape[0]
    return encoded


FORMATS = {"fp16+scale": fp16_scaled, "int8+row-scale": int8_rows,
           "fp16 correlation+diag": on_correlation(fp16_scaled), "int8 correlation+diag": on_correlation(int8_rows),
           **{f"lowrank{r}+diag": low_rank_diagonal(r) for r in (8, 32, 64)}}


def hessian_formats(weights, hessians, other_seed) -> dict:
    """`other_seed`: the H of every layer from other calibration samples of the same
    domain, the 'format' that shows what calibration noise alone changes."""
    distinct = {}
    for layer, h in hessians.items():
        distinct.setdefault(id(h), (h, []))[1].append(layer)
    options = PCGOptions(iterations=20, tolerance=0)
    masks, objective_ref = {}, 0.0
    for layer, weight in weights.items():
        h = hessians[layer]
        for label in ("50%", "2:4"):
            masks[layer, label] = sparsegpt_prune(weight, h, STRUCTURES[label], None, 128, DAMPENING, layer)[0]
        masks[layer, "wanda"] = wanda_mask(weight, h, STRUCTURES["50%"])
        fitted = refit(weight, h, masks[layer, "wanda"], "pcg", DAMPENING, options)
        objective_ref += float(reconstruction_error(fitted, h, weight).sum())
    total = sum(weight.numel() for weight in weights.values())
    results = {}
    formats = dict(FORMATS)
    formats["float32, other calibration seed"] = lambda h: (other_seed[id(h)], 4 * h.shape[0] ** 2)
    for fmt, encode in formats.items():
        stored = full = half = 0
        errors, equal, objective = [], {"50%": 0, "2:4": 0}, 0.0
        for h, layers in distinct.values():
            decoded, size = encode(h)
            n = h.shape[0]
            stored, full, half = stored + size, full + 4 * n * n, half + 4 * n * (n + 1) // 2
            errors.append(float((decoded - h).norm() / h.norm()))
            for layer in layers:
                weight = weights[layer]
                for label in equal:
                    chosen = sparsegpt_prune(weight, decoded, STRUCTURES[label], None, 128, DAMPENING, layer)[0]
                    equal[label] += int((chosen == masks[layer, label]).sum())
                fitted = refit(weight, decoded, masks[layer, "wanda"], "pcg", DAMPENING, options)
                objective += float(reconstruction_error(fitted, h, weight).sum())
        results[fmt] = {"bytes_vs_float32_full": stored / full, "bytes_vs_float32_half": stored / half,
                        "max_relative_error": max(errors), "mean_relative_error": sum(errors) / len(errors),
                        "sparsegpt_mask_agreement_50": equal["50%"] / total,
                        "sparsegpt_mask_agreement_24": equal["2:4"] / total,
                        "pcg_objective_vs_float32": objective / objective_ref}
    print("\n### Hessian storage (one H per distinct layer input, dense model)\n\n| format | bytes vs float32 H | "
          "vs float32 half | ‖Ĥ−H‖/‖H‖ mean (max) | SparseGPT mask agreement 50 % | 2:4 | pcg20 objective vs float32 H |"
          "\n|---|---|---|---|---|---|---|")
    for fmt, row in results.items():
        print(f"| {fmt} | {row['bytes_vs_float32_full']:.4f} | {row['bytes_vs_float32_half']:.4f} | "
              f"{row['mean_relative_error']:.2e} ({row['max_relative_error']:.2e}) | {100 * row['sparsegpt_mask_agreement_50']:.3f} % | "
              f"{100 * row['sparsegpt_mask_agreement_24']:.3f} % | {row['pcg_objective_vs_float32']:.5f} |")
    return results


def other_seed(model, tokenizer, hessians, args) -> dict[int, torch.Tensor]:
    """id(H) → the same layer input's H from calibration seed 1."""
    samples = calibration_samples(ingest(args.domain), tokenizer, args.nsamples, args.seqlen, 1)
    other = dense_hessians(model, list(samples.split(8)))
    return {id(hessians[name]): other[name] for name in hessians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "data/models/reference"))
    parser.add_argument("--domain", default="builtin:docs", help="the calibration domain")
    parser.add_argument("--eval-domains", default="builtin:docs,builtin:lexicon,builtin:code")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--owl-lambda", type=float, default=0.08)
    parser.add_argument("--owl-m", type=float, default=5.0)
    parser.add_argument("--owl-layer-mean", action="store_true", help="OWL ratios against each layer's own mean")
    parser.add_argument("--cells", default="", help="comma list of perplexity cells (structure/mask/profile/refit); "
                        "default all")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, 2 threads made elementwise ops ~60x slower)")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: reconstruction,perplexity,formats")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "refit_owl.json")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    calibration = calibration_samples(ingest(args.domain), tokenizer, args.nsamples, args.seqlen, 0)
    batches = list(calibration.split(8))
    windows = {spec.split(":")[-1]: evaluation_windows(ingest(spec), tokenizer, args.seqlen, args.eval_tokens)
               for spec in args.eval_domains.split(",")}
    dense = {name: weight_matrix(module).detach().clone() for name, module in all_prunable(model).items()}
    weights = {name: weight.float() for name, weight in dense.items()}
    hessians = dense_hessians(model, batches)
    report = {"model": args.model, "calibration": {"domain": args.domain, "nsamples": args.nsamples,
                                                   "seqlen": args.seqlen}, "dampening": DAMPENING,
              "threads": torch.get_num_threads()}
    parts = {"reconstruction": lambda: reconstruction(weights, hessians),
             "perplexity": lambda: perplexity_cells(model, dense, hessians, batches, windows, args),
             "formats": lambda: hessian_formats(weights, hessians, other_seed(model, tokenizer, hessians, args))}
    for part, measure in parts.items():
        if part not in skip:
            report[part] = measure()
            args.out.write_text(json.dumps(report, indent=1) + "\n")  # what is measured is kept


if __name__ == "__main__":
    main()
