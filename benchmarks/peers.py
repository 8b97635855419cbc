"""copal vs llm-compressor: Wanda and SparseGPT on SmolLM2-135M, side by side.

The peer tool, llm-compressor, runs in a venv of its own
(benchmarks/.venv-peers, made by benchmarks/peers_setup.sh: it pins a
transformers older than the project's); this script runs in the project's
.venv and starts every pruning run as a fresh subprocess:

1. **windows**: copal's calibration windows (`copal.windows.calibration_samples`
   on builtin:docs, nsamples × seqlen, seed 0) go to SCRATCH/windows.json.
2. **prune**, one subprocess per case, each timed inside itself around its
   pruning call only (process CPU seconds, wall seconds) with the process's
   peak RSS (VmHWM: imports and model load included) and the peak from the
   start of the call:
   * copal: a one-domain reprune step (`copal.lifecycle.start_step/calibrate/
     prune`) on builtin:docs with the same nsamples/seqlen/seed (it checks its
     batches are the windows in the file); SparseGPT in both unstructured
     scopes (`mask_scope: row`, copal's default, and `layer`, per 128-column
     block across rows like the paper and llm-compressor);
   * llm-compressor (benchmarks/peers_llmc.py in .venv-peers): `oneshot` with
     WandaPruningModifier / SparseGPTModifier (block_size 128,
     dampening_frac 0.01), the decoder blocks' Linear layers, lm_head ignored,
     the sequential pipeline on the CPU, fed exactly the windows' token ids.
   Each saves its pruned model as dense safetensors under SCRATCH/models/.
3. **evaluate** every saved model (and the dense one) with copal's PPL
   protocol (what `copal eval` does: `copal.model.load_model`,
   `copal.windows.evaluation_windows(seqlen, max_tokens)`, `copal.metrics.perplexity`)
   on the five builtin domains, here in the project's venv for both tools.
4. **masks**: per layer, the fraction of weights whose zero pattern agrees
   between copal's and llm-compressor's model for the same method and
   structure (overall: weighted by the layer's size).

Output: reports/peers.json (one row per tool × method × structure [× scope])
and reports/peers_layers.json (per-layer agreement and sparsity).

    bash benchmarks/peers_setup.sh && .venv/bin/python benchmarks/peers.py \
        [--nsamples 16 --seqlen 128] [--eval-tokens 4096] [--threads 1] [--scratch /tmp/copal-peers] \
        [--cases copal/wanda/2:4,llm-compressor/wanda/2:4] [--reuse]

Every process runs torch with --threads threads (1 by default: on this shared
2-core machine two OpenMP threads stall whenever another process holds a core,
which made the pruning 2.5-16x slower and its timings meaningless).

`--reuse` keeps the pruned models (and their timings) and PPLs a previous run
left in SCRATCH; without it everything is recomputed.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from proc_memory import reset_peak, status_mb  # a sibling module (benchmarks/ is sys.path[0])

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEERS_PYTHON = ROOT / "benchmarks" / ".venv-peers" / "bin" / "python"
MODEL = "data/models/smollm2-135m"
CAL_DOMAIN = "builtin:docs"
DOMAINS = ["builtin:docs", "builtin:lexicon", "builtin:code", "builtin:fortunes", "builtin:manuals"]
# (tool, method, structure, scope): scope is copal's unstructured mask_scope
# (None for N:M and for llm-compressor, whose scopes are fixed by its code).
CASES = [
    ("copal", "wanda", "unstructured", "row"),
    ("llm-compressor", "wanda", "unstructured", None),
    ("copal", "wanda", "2:4", None),
    ("llm-compressor", "wanda", "2:4", None),
    ("copal", "sparsegpt", "unstructured", "row"),
    ("copal", "sparsegpt", "unstructured", "layer"),
    ("llm-compressor", "sparsegpt", "unstructured", None),
    ("copal", "sparsegpt", "2:4", None),
    ("llm-compressor", "sparsegpt", "2:4", None),
]


def case_key(tool: str, method: str, structure: str, scope: str | None) -> str:
    return "/".join(filter(None, (tool, method, structure, scope)))


def case_folder(key: str) -> str:
    return key.replace("/", "-").replace(":", "of")


def code_state() -> dict:
    """The commit, and a hash of copal/*.py as they are now (others edit them while this runs)."""
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "copal"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    digest = hashlib.sha256()
    for file in sorted((ROOT / "copal").rglob("*.py")):
        digest.update(file.relative_to(ROOT).as_posix().encode() + b"\0" + file.read_bytes())
    return {"commit": revision, "copal_dirty": bool(dirty), "copal_sources_sha256": digest.hexdigest()[:16]}


# ----------------------------------------------------------------------------- windows


def write_windows(path: Path, nsamples: int, seqlen: int, seed: int) -> dict:
    from copal.data import ingest
    from copal.windows import calibration_samples
    from copal.model import load_tokenizer

    tokenizer = load_tokenizer(str(ROOT / MODEL))
    domain = ingest(CAL_DOMAIN)
    windows = calibration_samples(domain, tokenizer, nsamples, seqlen, seed)
    info = {"domain": CAL_DOMAIN, "fingerprint": domain.fingerprint, "nsamples": nsamples, "seqlen": seqlen,
            "seed": seed, "sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]}
    path.write_text(json.dumps(info | {"input_ids": windows.tolist()}) + "\n")
    return info


# ----------------------------------------------------------------------------- copal's child


def copal_child(spec: dict) -> None:
    """In a fresh process: a one-domain reprune step through copal's library."""
    import torch

    import copal.continual as continual
    from copal import lifecycle
    from copal.config import build_config
    from copal.export import export_step
    from copal.allocator import limit_allocator_fragmentation

    limit_allocator_fragmentation()  # as the command line does
    rss_after_imports = status_mb("VmRSS")
    windows = json.loads(Path(spec["windows"]).read_text())
    raw = {"name": "peers", "model": str(ROOT / MODEL), "domains": [CAL_DOMAIN], "method": spec["method"],
           "regime": "reprune", "structure": spec["structure"], "sparsity": 0.5,
           "mask_scope": spec["scope"] or "row",
           "calibration": {"nsamples": windows["nsamples"], "seqlen": windows["seqlen"], "seed": windows["seed"],
                           "batch_size": spec["batch_size"]},
           "evaluation": {"seqlen": 256, "max_tokens": 512}, "device": "cpu",
           "sparsegpt": {"blocksize": 128, "dampening": 0.01}}
    run_dir = Path(spec["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    run = continual.ContinualRun(build_config(raw, "peers"), run_dir)
    rss_after_load = status_mb("VmRSS")
    peak_before = status_mb("VmHWM")
    reset_peak()
    cpu, wall = time.process_time(), time.perf_counter()
    pending = lifecycle.start_step(run.session, 0)
    lifecycle.calibrate(run.session, pending)
    lifecycle.prune(run.session, pending)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    prune_peak = status_mb("VmHWM")
    fed = torch.cat(pending.batches).tolist()
    result = {"tool": "copal", "method": spec["method"], "structure": spec["structure"], "scope": spec["scope"],
              "prune_cpu_seconds": cpu, "wall_seconds": wall, "copal_prune_seconds": pending.prune_seconds,
              "peak_rss_mb": max(peak_before, prune_peak), "prune_peak_rss_mb": prune_peak,
              "rss_after_imports_mb": rss_after_imports, "rss_after_load_mb": rss_after_load,
              "threads": torch.get_num_threads(), "calibration_same_windows": sorted(fed) == sorted(windows["input_ids"]),
              "calibration_same_order": fed == windows["input_ids"], "code": code_state()}
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    # the model streams its blocks (its skeleton holds no weights): record the step and
    # export it, as `copal export` does
    lifecycle.finish_step(run.session, pending, run.evaluator.evaluate(pending))
    export_step(run_dir, pending.step_id, out)
    Path(spec["result"]).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- pruning runs


def prune_case(case: tuple, args, scratch: Path, windows_path: Path) -> dict:
    tool, method, structure, scope = case
    key = case_key(*case)
    folder = scratch / "models" / case_folder(key)
    result_path = scratch / "results" / f"{case_folder(key)}.json"
    if args.reuse and result_path.is_file() and (folder / "config.json").is_file():
        print(f"prune {key}: reusing {folder}", flush=True)
        return json.loads(result_path.read_text())
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    log = scratch / "logs" / f"{case_folder(key)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if tool == "copal":
        spec = {"method": method, "structure": structure, "scope": scope, "windows": str(windows_path),
                "batch_size": args.batch_size, "run_dir": str(scratch / "runs" / case_folder(key)),
                "out": str(folder), "result": str(result_path)}
        command = [sys.executable, __file__, "--copal-child", json.dumps(spec)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    else:
        if not PEERS_PYTHON.exists():
            raise SystemExit(f"{PEERS_PYTHON} missing: run `bash benchmarks/peers_setup.sh` first")
        command = [str(PEERS_PYTHON), str(ROOT / "benchmarks" / "peers_llmc.py"), "--model", str(ROOT / MODEL),
                   "--windows", str(windows_path), "--method", method, "--structure", structure,
                   "--batch-size", str(args.batch_size), "--block-size", "128", "--dampening", "0.01",
                   "--out", str(folder), "--result", str(result_path)]
        # its own venv only: no project paths leak in
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {
            "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    print(f"prune {key} ...", flush=True)
    started = time.perf_counter()
    with log.open("w") as stream:
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"prune {key} failed (exit {done.returncode}); last lines of {log}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["process_seconds"] = time.perf_counter() - started
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"  cpu {result['prune_cpu_seconds']:.1f} s, wall {result['wall_seconds']:.1f} s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


# ----------------------------------------------------------------------------- evaluation


def evaluate(model_dir: Path, args, cache: Path) -> dict:
    """`copal eval --model DIR --data D --seqlen 256 --max-tokens N` for each domain."""
    if args.reuse and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("eval_tokens") == args.eval_tokens and saved.get("model_mtime") == _mtime(model_dir):
            return saved["ppl"]
    from copal.data import ingest
    from copal.windows import evaluation_windows
    from copal.metrics import perplexity
    from copal.model import load_model, resolve_device

    model, tokenizer = load_model(str(model_dir))
    ppl = {}
    for spec in DOMAINS:
        domain = ingest(spec)
        value, _ = perplexity(model, evaluation_windows(domain, tokenizer, 256, args.eval_tokens),
                              resolve_device("cpu"))
        ppl[domain.name] = value
    del model
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"eval_tokens": args.eval_tokens, "model_mtime": _mtime(model_dir), "ppl": ppl}))
    return ppl


def _mtime(model_dir: Path) -> float:
    return max(file.stat().st_mtime for file in model_dir.glob("*.safetensors"))


# ----------------------------------------------------------------------------- masks


def decoder_weights(model_dir: Path) -> dict:
    """The 2-D weights inside the decoder blocks (what both tools prune), by name."""
    from safetensors import safe_open

    weights = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                if key.startswith("model.layers.") and key.endswith(".weight"):
                    tensor = handle.get_tensor(key)
                    if tensor.dim() == 2:
                        weights[key.removesuffix(".weight")] = tensor
    return weights


def zero_masks(model_dir: Path) -> dict:
    return {name: weight == 0 for name, weight in decoder_weights(model_dir).items()}


def sparsity(masks: dict) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def _layer_order(name: str) -> tuple:
    """model.layers.N.rest → (N, rest): block order, not string order."""
    parts = name.split(".")
    return int(parts[2]), ".".join(parts[3:])


def agreement(a: dict, b: dict) -> tuple[float, dict]:
    if a.keys() != b.keys():
        raise SystemExit(f"the two models prune different layers: {sorted(a.keys() ^ b.keys())[:5]}")
    layers = {name: float((a[name] == b[name]).float().mean()) for name in sorted(a, key=_layer_order)}
    total = sum(a[name].numel() for name in a)
    overall = sum(layers[name] * a[name].numel() for name in a) / total
    return overall, layers


def untouched(model_dir: Path, dense_dir: Path) -> bool:
    """Embeddings, norms and head are those of the dense model (only decoder linears pruned)."""
    from safetensors import safe_open

    def rest(folder):
        tensors = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    if not (key.startswith("model.layers.") and key.endswith("_proj.weight")):
                        tensors[key] = handle.get_tensor(key)
        return tensors

    mine, dense = rest(model_dir), rest(dense_dir)
    return mine.keys() == dense.keys() and all(bool((mine[k] == dense[k]).all()) for k in mine)


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every process (pruning children and evaluation); 0: torch's default "
                             "(all cores). 1 by default: on a shared 2-core machine two OpenMP threads wait on each "
                             "other whenever another process holds a core (measured: 2.5-16x slower)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/copal-peers"))
    parser.add_argument("--cases", default="", help="comma list of case keys (tool/method/structure[/scope])")
    parser.add_argument("--reuse", action="store_true", help="keep pruned models and PPLs already in SCRATCH")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "peers.json")
    parser.add_argument("--layers-out", type=Path, default=ROOT / "reports" / "peers_layers.json")
    parser.add_argument("--copal-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.copal_child:
        return copal_child(json.loads(args.copal_child))

    started = time.perf_counter()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the children's torch reads it at start
    scratch = args.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    chosen = [case for case in CASES if not args.cases or case_key(*case) in args.cases.split(",")]
    if args.cases and len(chosen) != len(args.cases.split(",")):
        raise SystemExit(f"--cases: known cases are {', '.join(case_key(*c) for c in CASES)}")

    windows_path = scratch / "windows.json"
    windows = write_windows(windows_path, args.nsamples, args.seqlen, args.seed)
    print(f"windows: {windows}", flush=True)
    code = code_state()

    results = {case_key(*case): prune_case(case, args, scratch, windows_path) for case in chosen}

    dense_dir = ROOT / MODEL
    print("evaluate dense ...", flush=True)
    dense_ppl = evaluate(dense_dir, args, scratch / "ppl" / "dense.json")
    masks, rows = {}, []
    for case in chosen:
        key = case_key(*case)
        folder = scratch / "models" / case_folder(key)
        print(f"evaluate {key} ...", flush=True)
        ppl = evaluate(folder, args, scratch / "ppl" / f"{case_folder(key)}.json")
        masks[key] = zero_masks(folder)
        result = results[key]
        row = {"tool": case[0], "method": case[1], "structure": case[2], "scope": case[3], "ppl": ppl,
               "avg_ppl": sum(ppl.values()) / len(ppl),
               "prune_cpu_seconds": round(result["prune_cpu_seconds"], 2),
               "wall_seconds": round(result["wall_seconds"], 2), "peak_rss_mb": round(result["peak_rss_mb"], 1),
               "prune_peak_rss_mb": round(result["prune_peak_rss_mb"], 1),
               "rss_after_load_mb": round(result["rss_after_load_mb"], 1),
               "sparsity": sparsity(masks[key]), "others_untouched": untouched(folder, dense_dir),
               "calibration_same_windows": result["calibration_same_windows"],
               "calibration_same_order": result["calibration_same_order"], "threads": result["threads"],
               "mask_agreement": None, "mask_agreement_with": None}
        if case[0] == "llm-compressor":
            row["versions"] = result["versions"]
        rows.append(row)

    # Agreement of each copal row with llm-compressor's row of the same method and structure;
    # llm-compressor's rows take the agreement with copal's default scope (row) and list all.
    layers_report = {"sparsity": {}, "agreement": {}}
    for row in rows:
        key = case_key(row["tool"], row["method"], row["structure"], row["scope"])
        layers_report["sparsity"][key] = {name: float(masks[key][name].float().mean())
                                          for name in sorted(masks[key], key=_layer_order)}
    for row in rows:
        if row["tool"] != "copal":
            continue
        peer = case_key("llm-compressor", row["method"], row["structure"], None)
        if peer not in masks:
            continue
        key = case_key(row["tool"], row["method"], row["structure"], row["scope"])
        overall, layers = agreement(masks[key], masks[peer])
        row["mask_agreement"], row["mask_agreement_with"] = overall, peer
        layers_report["agreement"][f"{key} vs {peer}"] = layers
        blocks = {}
        for name, value in layers.items():
            blocks.setdefault(_layer_order(name)[0], []).append(value)
        row["first_block_differing"] = next((b for b, values in sorted(blocks.items()) if min(values) < 1), None)
        row["mask_agreement_min_by_block"] = {b: round(min(values), 6) for b, values in sorted(blocks.items())}
        for other in rows:
            if case_key(other["tool"], other["method"], other["structure"], other["scope"]) == peer:
                other.setdefault("mask_agreement_by_copal_scope", {})[row["scope"] or "n:m"] = overall
                if row["scope"] in (None, "row"):
                    other["mask_agreement"], other["mask_agreement_with"] = overall, key

    import torch
    import transformers

    seconds = time.perf_counter() - started
    meta = {"model": MODEL, "calibration": windows,
            "evaluation": {"seqlen": 256, "max_tokens": args.eval_tokens, "domains": DOMAINS}, "code": code,
            "copal_versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "dense_ppl": dense_ppl, "dense_avg_ppl": sum(dense_ppl.values()) / len(dense_ppl), "seconds": seconds}
    for row in rows:
        row["dense_ppl"] = dense_ppl
        row["calibration"] = {k: windows[k] for k in ("domain", "nsamples", "seqlen", "seed", "sha256")}
        row["eval_tokens"] = args.eval_tokens
        if row["tool"] == "copal":  # the library as the child process saw it (others edit it meanwhile)
            child_code = results[case_key(row["tool"], row["method"], row["structure"], row["scope"])].get("code")
            row["versions"] = meta["copal_versions"] | {"copal": child_code or code}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    scopes = [case_key("copal", "sparsegpt", "unstructured", scope) for scope in ("row", "layer")]
    if all(key in masks for key in scopes):  # copal's two SparseGPT scopes against each other
        layers_report["agreement"][" vs ".join(scopes)] = agreement(masks[scopes[0]], masks[scopes[1]])[1]
    args.layers_out.write_text(json.dumps({"run": meta} | layers_report, indent=1) + "\n")
    report = meta | {"rows": rows}
    print_table(report)
    print(f"wrote {args.out} and {args.layers_out} in {report['seconds']:.0f} s", flush=True)


def print_table(report: dict) -> None:
    names = list(report["dense_ppl"])
    print("| tool | method | structure | scope | " + " | ".join(names) + " | avg | CPU s | wall s | peak RSS MB "
          "| mask agreement |")
    print("|---" * (9 + len(names)) + "|")
    print("| dense | | | | " + " | ".join(f"{report['dense_ppl'][n]:.2f}" for n in names)
          + f" | {report['dense_avg_ppl']:.2f} | | | | |")
    for row in report["rows"]:
        agreement = "" if row["mask_agreement"] is None else f"{row['mask_agreement']:.4f}"
        print(f"| {row['tool']} | {row['method']} | {row['structure']} | {row['scope'] or ''} | "
              + " | ".join(f"{row['ppl'][n]:.2f}" for n in names)
              + f" | {row['avg_ppl']:.2f} | {row['prune_cpu_seconds']:.1f} | {row['wall_seconds']:.1f} "
                f"| {row['peak_rss_mb']:.0f} | {agreement} |")


if __name__ == "__main__":
    main()
