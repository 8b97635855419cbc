"""Compact step state (issue 10, part 2): how small can the accumulate regime's
recorded statistic be before COPAL's masks change?

Two measurements, written to reports/compact_state.json:

* `layers` — real COPAL statistics S_t (output sensitivity |Y|ᵀ|X| of the dense
  model, per domain) of the reference model's layers and of some SmolLM2-135M
  layers, accumulated over the demo's five domains with every candidate
  storage form: the mask at step t comes from combine(decode(stored C_{t-1}),
  S_t) as in a run, and is compared with the float32 path's mask (50 %
  unstructured per row, and 2:4). Candidates: bfloat16, the library's
  log-domain codecs (copal.codecs.LogCodec, 8/4/3 bits, Lloyd levels; 3 bits
  also on a uniform grid; 2 bits), and rank-k factorisations (truncated SVD,
  clamped at 0, float32 factors).
* `runs` — whole continual runs of the reference model with the benchmark's
  config (configs/bench.yaml: five domains, 64 × 256 calibration tokens, 16k
  evaluation tokens per domain) and `state.format` set to each library format:
  average PPL, BWT, mask agreement with the float32 run at every step, and the
  bytes each step stores.

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compact_state.py \\
        [--part layers runs] [--formats float32 log3 …] [--out reports/compact_state.json]

Bytes per weight are what a step stores per prunable weight (statistic + the
bit-packed mask, 1/8 byte), and `x_fp16` that over the 2 bytes of an fp16 weight.
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from copal.config import BENCH_CONFIG, build_config, load_raw
from copal.domains import RunDomains
from copal.masks import Structure, select_mask
from copal.methods import Copal, LayerInput, OutputSensitivity
from copal.model import all_prunable, load_model, weight_matrix
from copal.codecs import CODECS, LogCodec, StateCodec

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ["builtin:docs", "builtin:lexicon", "builtin:code", "builtin:fortunes", "builtin:manuals"]
STRUCTURES = {"u50": Structure(0.5, None, "row"), "2:4": Structure(0.5, (2, 4), "row")}
MASK_BYTES = 1 / 8
NOTES = ["bytes_per_weight: what a step stores per prunable weight (statistic + bit-packed mask 1/8 B); "
         "x_fp16 = that / 2 (fp16 weight bytes)",
         "layers.*.candidates.*.agreement: fraction of mask bits equal to the float32 path's at step t, "
         "each step reading the previous step's stored (encoded) C_{t-1}",
         "runs: reference model, configs/bench.yaml with state.format set; mask_agreement vs the float32 "
         "run's masks at each step; bytes_per_weight: files in steps/K/sensitivity + masks.safetensors"]


class LowRank(StateCodec):
    """Rank-k truncated SVD of C (clamped at 0 when decoded), float32 factors."""

    def __init__(self, rank: int):
        self.rank = rank
        self.name = f"svd-rank{rank}"

    def encode(self, name, value):
        u, s, vh = torch.linalg.svd(value.double(), full_matrices=False)
        k = min(self.rank, s.numel())
        return {f"{name}.u": (u[:, :k] * s[:k]).float(), f"{name}.v": vh[:k].float()}

    def decode(self, name, get):
        return (get(f"{name}.u") @ get(f"{name}.v")).clamp(min=0)


def candidates() -> dict[str, StateCodec]:
    found = {name: codec for name, codec in CODECS.items() if name != "float32"}
    found["log3-uniform"] = LogCodec(8, grid="uniform")
    found["log2"] = LogCodec(4)
    for rank in (1, 8, 32):
        found[f"svd-rank{rank}"] = LowRank(rank)
    return found


def domain_statistics(model_path: Path, blocks: list[int], nsamples: int, seqlen: int) -> tuple[dict, dict]:
    """{layer: W0 float32} and {layer: [S_1..S_5]} of the dense model's layers in `blocks`."""
    raw = {"model": str(model_path), "domains": DOMAINS, "calibration": {"nsamples": nsamples, "seqlen": seqlen}}
    config = build_config(raw)
    model, tokenizer = load_model(config.model, "float32")
    domains = RunDomains(config, tokenizer)
    for spec in DOMAINS:
        domains.add(spec)
    layers = model.model.layers
    model.model.layers = layers[:max(blocks) + 1]  # later blocks do not change these statistics
    chosen = {name: module for name, module in all_prunable(model).items()
              if any(name.startswith(f"model.layers.{b}.") for b in blocks)}
    weights = {name: weight_matrix(module).detach().float().clone() for name, module in chosen.items()}
    per_domain = {name: [] for name in chosen}
    for domain in domains:
        stats = {name: OutputSensitivity(tuple(weights[name].shape), torch.device("cpu")) for name in chosen}
        handles = [module.register_forward_hook(
            lambda m, args, out, name=name: stats[name].add(
                LayerInput(args[0].detach().reshape(-1, args[0].shape[-1]).float()),
                out.detach().reshape(-1, out.shape[-1]).float()))
            for name, module in chosen.items()]
        with torch.no_grad():
            for batch in domains.samples(domain).split(4):
                model(input_ids=batch, use_cache=False)
        for handle in handles:
            handle.remove()
        for name in chosen:
            per_domain[name].append(stats[name].value)
    return weights, per_domain


def layer_agreement(weights: dict, per_domain: dict) -> dict:
    """Per candidate: bytes per weight and, per structure and step t ≥ 2, the
    fraction of mask bits equal to the float32 path's (over all layers)."""
    method = Copal(sensitivity="output")
    total = sum(w.numel() for w in weights.values())
    reference = {}  # (layer, structure, t) → float32 mask
    for name, weight in weights.items():
        combined = None
        for t, fresh in enumerate(per_domain[name], start=1):
            combined = method.combine(combined, fresh)
            for label, structure in STRUCTURES.items():
                reference[name, label, t] = select_mask(weight.abs() * combined, structure)
    results = {}
    for codec_name, codec in candidates().items():
        stored_bytes = 0
        equal = {(label, t): 0 for label in STRUCTURES for t in range(2, len(DOMAINS) + 1)}
        started = time.perf_counter()
        for name, weight in weights.items():
            stored = None
            for t, fresh in enumerate(per_domain[name], start=1):
                previous = None if stored is None else codec.decode(name, stored.__getitem__)
                combined = method.combine(previous, fresh)
                if t > 1:
                    for label, structure in STRUCTURES.items():
                        mask = select_mask(weight.abs() * combined, structure)
                        equal[label, t] += int((mask == reference[name, label, t]).sum())
                stored = codec.encode(name, combined)
            stored_bytes += sum(tensor.numel() * tensor.element_size() for tensor in stored.values())
        per_weight = stored_bytes / total + MASK_BYTES
        results[codec_name] = {
            "bytes_per_weight": per_weight, "x_fp16": per_weight / 2,
            "statistic_bits_per_weight": 8 * stored_bytes / total,
            "agreement": {label: {str(t): equal[label, t] / total for t in range(2, len(DOMAINS) + 1)}
                          for label in STRUCTURES},
            "seconds": time.perf_counter() - started}
        print(f"  {codec_name:14s} {per_weight:7.4f} B/w ({per_weight / 2:.3f}× fp16)  " + "  ".join(
            f"{label} t=2 {equal[label, 2] / total:.4f} t=5 {equal[label, 5] / total:.4f}" for label in STRUCTURES),
            flush=True)
    return results


def run_layers(report: dict, cache: Path | None = None) -> None:
    setups = {"reference": (ROOT / "data/models/reference", [0, 1, 2, 3], 64, 256),
              "smollm2-135m": (ROOT / "data/models/smollm2-135m", [0, 15, 29], 8, 256)}
    report["layers"] = {}
    for label, (path, blocks, nsamples, seqlen) in setups.items():
        print(f"{label}: blocks {blocks}, {nsamples} × {seqlen} calibration tokens per domain", flush=True)
        cached = cache / f"{label}.pt" if cache else None
        if cached and cached.exists():
            weights, per_domain = torch.load(cached)
        else:
            weights, per_domain = domain_statistics(path, blocks, nsamples, seqlen)
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save((weights, per_domain), cached)
        report["layers"][label] = {
            "blocks": blocks, "calibration": {"nsamples": nsamples, "seqlen": seqlen},
            "layers": {name: list(w.shape) for name, w in weights.items()},
            "weights": sum(w.numel() for w in weights.values()),
            "float32_bytes_per_weight": 4 + MASK_BYTES,
            "candidates": layer_agreement(weights, per_domain)}


def _masks(run: Path, step: int) -> dict[str, torch.Tensor]:
    from copal.state import StepState
    state = StepState(run / "steps" / str(step))
    return {name: state.mask(name) for name in state.mask_names()}


def _step_bytes(run: Path, step: int) -> int:
    folder = run / "steps" / str(step)
    return sum(p.stat().st_size for p in (folder / "sensitivity").glob("*.safetensors")) + \
        (folder / "masks.safetensors").stat().st_size


def run_runs(report: dict, formats: list[str], structures: list[str], scratch: Path) -> None:
    from copal.continual import ContinualRun

    base = load_raw(None, default=BENCH_CONFIG)
    runs = report.setdefault("runs", {})
    for structure in structures:
        for fmt in (["float32"] + [f for f in formats if f != "float32"]):
            key = f"{fmt}-{structure}"
            raw = dict(base, state={"format": fmt},
                       structure="unstructured" if structure == "u50" else structure, sparsity=0.5)
            config = build_config(raw, "compact_state")
            out = scratch / key
            started = time.perf_counter()
            run = ContinualRun(config, out)
            metrics = run.run()
            prunable = sum(weight_matrix(m).numel() for m in all_prunable(run.session.model).values())
            entry = {"avg_ppl": metrics.avg_ppl, "bwt": metrics.bwt, "seconds": time.perf_counter() - started,
                     "bytes_per_weight": {str(s): _step_bytes(out, s) / prunable for s in range(1, 6)}}
            reference = scratch / f"float32-{structure}"
            if fmt != "float32":
                agreement = {}
                for step in range(1, 6):
                    ours, theirs = _masks(out, step), _masks(reference, step)
                    same = sum(int((ours[n] == theirs[n]).sum()) for n in ours)
                    agreement[str(step)] = same / sum(m.numel() for m in ours.values())
                entry["mask_agreement"] = agreement
            runs[key] = entry
            print(f"{key:18s} avg PPL {entry['avg_ppl']:.3f}  BWT {entry['bwt']:.3f}  "
                  f"step-5 bytes/w {entry['bytes_per_weight']['5']:.4f}  "
                  f"agreement {entry.get('mask_agreement', {})}", flush=True)
            yield


def sparsegpt_cost(report: dict) -> None:
    """What sparsegpt/accumulate stores per prunable weight, from its writer's
    layout: each layer's Hessian (in × in float32; layers that share one store
    their own copy) and its reconstructed weight (the model's dtype)."""
    from transformers import AutoConfig

    shapes = {}
    for label, path in (("reference", ROOT / "data/models/reference"), ("smollm2-135m", ROOT / "data/models/smollm2-135m")):
        c = AutoConfig.from_pretrained(path)
        h, i = c.hidden_size, c.intermediate_size
        kv = c.num_key_value_heads * getattr(c, "head_dim", h // c.num_attention_heads)
        shapes[label] = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    shapes["llama-7b"] = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
    cost = {}
    for label, layers in shapes.items():
        weights = sum(o * i for o, i in layers)
        hessian = sum(i * i * 4 for o, i in layers)
        cost[label] = {"hessian_bytes_per_weight": hessian / weights,
                       "weights_bytes_per_weight_fp16": 2.0, "weights_bytes_per_weight_float32": 4.0,
                       "x_fp16_with_fp16_weights": (hessian / weights + 2 + MASK_BYTES) / 2}
    report["sparsegpt_accumulate"] = cost


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", default=["layers", "runs"], choices=["layers", "runs"])
    parser.add_argument("--formats", nargs="+", default=["log3", "log4", "log8", "bfloat16"])
    parser.add_argument("--structures", nargs="+", default=["u50", "2:4"])
    parser.add_argument("--out", type=Path, default=ROOT / "reports/compact_state.json")
    parser.add_argument("--cache", type=Path, default=None, help="keep the layers' statistics here (a folder)")
    parser.add_argument("--scratch", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report.update(issue="10 part 2: compact step state", threads=torch.get_num_threads(), notes=NOTES,
                  command="nice -n 5 env OMP_NUM_THREADS=1 python benchmarks/compact_state.py")

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    sparsegpt_cost(report)
    if "layers" in args.part:
        run_layers(report, args.cache)
        save()
    if "runs" in args.part:
        scratch = args.scratch or Path(tempfile.mkdtemp(prefix="compact_state-"))
        try:
            for _ in run_runs(report, args.formats, args.structures, scratch):
                save()
        finally:
            if args.scratch is None:
                shutil.rmtree(scratch, ignore_errors=True)
    save()
    return report


if __name__ == "__main__":
    main()
