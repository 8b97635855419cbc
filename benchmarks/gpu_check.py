#!/usr/bin/env python3
"""The CUDA path, measured: one prepared script for a GPU machine (issues 21 and 24).

Drives `copal.continual.ContinualRun` directly (no Prefect, MLflow or DVC: a bare CUDA
image has none) and writes OUT/gpu_check.json, rewritten after every run so that a
timeout keeps what finished. Phases, in order, each skipped once the budget is spent:

  env    torch / transformers / GPU facts, a bf16 and an fp32 matmul rate
  ref    the shipped reference model on five jsonl domains, accumulate 50 %: copal
         (default), sparsegpt and wanda on the GPU, copal and sparsegpt on the CPU, and
         copal in bf16 on both. CPU vs GPU: mask agreement over all bits and per layer,
         average PPL difference; a GPU step replayed on the CPU (copal replay's check);
         pass and evaluation tokens/s; peak GPU memory
  scale  a LLaMA 1.1B shape (TinyLlama dims, random weights, bf16, streamed), two
         domains, 64x1024 calibration tokens: each method's prune seconds per step
         against two plain forwards of the same batches (the floor)
  big    a LLaMA-2-7B shape, one wanda step against its floor

Usage: gpu_check.py OUT   (run from the repository root; benchmarks/gpu_check.sh sets
up a bare CUDA image first). Environment: BUDGET seconds for all phases (420),
PHASES (comma list), JSONL folder of <domain>.jsonl files (benchmarks/.gpu/jsonl),
SMALL=1 tiny shapes and two domains: the CPU dry run CI makes of this script.
"""

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from copal.config import load_config  # noqa: E402
from copal.continual import ContinualRun  # noqa: E402
from copal.rundir import RunDir  # noqa: E402

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "reports"
SMALL = bool(os.environ.get("SMALL"))
BUDGET = float(os.environ.get("BUDGET", 420))
PHASES = os.environ.get("PHASES", "env,ref,scale,big").split(",")
JSONL = Path(os.environ.get("JSONL", ROOT / "benchmarks" / ".gpu" / "jsonl"))
NAMES = ("docs", "lexicon", "code", "fortunes", "manuals")
WORK = Path(tempfile.mkdtemp(prefix="copal-gpu-check-"))
CUDA = torch.cuda.is_available()
GPU = "cuda" if CUDA else "cpu"  # the dry run's "GPU" runs are CPU runs
T0 = time.time()
results: dict = {"small": SMALL, "phases": {}}


def left() -> float:
    return BUDGET - (time.time() - T0)


def save() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    results["elapsed_s"] = round(time.time() - T0, 1)
    (OUT / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def say(*parts) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *parts, flush=True)


def domains(count: int) -> str:
    names = [name for name in NAMES if (JSONL / f"{name}.jsonl").exists()][:count]
    if len(names) < count:
        raise FileNotFoundError(f"{JSONL}: needs {count} of {', '.join(f'{n}.jsonl' for n in NAMES)}")
    return json.dumps([f"{name}=jsonl:{(JSONL / f'{name}.jsonl').resolve()}" for name in names])


# ---------------------------------------------------------------------------- one run


def one_run(tag: str, overrides: list[str]) -> tuple[dict, Path]:
    """A whole continual run; (its summary, its run directory)."""
    config = load_config(ROOT / "configs" / "demo.yaml", [f"name=gpu-{tag}"] + overrides)
    root = WORK / "runs" / tag
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    run = ContinualRun(config, root, data_dir=WORK / "arrow")
    metrics = run.run()
    sync()
    wall = time.time() - started
    lineage = RunDir(root).lineage()
    calibration_tokens = config.calibration.nsamples * config.calibration.seqlen
    records = [state.record for state in lineage]
    eval_tokens = [sum(record.eval_tokens.values()) for record in records]
    eval_seconds = [record.seconds - record.prune_seconds for record in records]
    summary = {
        "wall_s": round(wall, 2), "device": str(run.session.device), "dtype": config.dtype,
        "streaming": run.session.execution.streamed,
        "prune_s": [round(record.prune_seconds, 3) for record in records],
        "step_s": [round(record.seconds, 3) for record in records],
        "pass_tokens_per_s": [round(calibration_tokens / record.prune_seconds) for record in records],
        "eval_tokens_per_s": [round(tokens / seconds) for tokens, seconds in zip(eval_tokens, eval_seconds)],
        "sparsity": [round(record.sparsity, 5) for record in records],
        "avg_ppl": metrics.avg_ppl, "bwt": metrics.bwt,
        "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if CUDA else None,
    }
    del run
    if CUDA:
        torch.cuda.empty_cache()
    return summary, root


def agreement(gpu_root: Path, cpu_root: Path) -> dict:
    """Mask bits the two runs share: over every layer of every step, and the worst layer-step."""
    gpu, cpu = RunDir(gpu_root).lineage(), RunDir(cpu_root).lineage()
    same = total = differing = 0
    worst = (1.0, "")
    for left_step, right_step in zip(gpu, cpu):
        for name in left_step.mask_names():
            a, b = left_step.mask(name), right_step.mask(name)
            equal = int((a == b).sum())
            same, total = same + equal, total + a.numel()
            differing += equal != a.numel()
            worst = min(worst, (equal / a.numel(), f"step {left_step.id} {name}"))
    return {"all_bits": same / total, "worst_layer": worst[0], "worst_layer_name": worst[1],
            "layer_steps_differing": differing, "layer_steps": sum(len(s.mask_names()) for s in gpu)}


def replay_on(device: str, root: Path) -> dict:
    """`copal replay`'s check of the run's last step, recomputed on `device`."""
    config = RunDir(root).read_config()[0].model_copy(update={"device": device})
    run = ContinualRun(config, root, data_dir=WORK / "arrow", readonly=True)
    step = RunDir(root).head()
    started = time.time()
    result = run.replay(step)
    return {"step": step, "device": device, "verified": result.verified, "facts_differing": result.facts,
            "layers_differing": len(result.differing), "lowest_layer_agreement": min(result.agreement.values()),
            "ppl": result.ppl, "report": result.lines(), "seconds": round(time.time() - started, 2)}


# ---------------------------------------------------------------------------- phases


def phase_env() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": CUDA,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if CUDA:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
        for dtype, label in ((torch.bfloat16, "bf16_tflops"), (torch.float32, "fp32_tflops")):
            a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
            a @ a
            sync()
            started = time.time()
            for _ in range(5):
                a @ a
            sync()
            info[label] = round(5 * 2 * 8192**3 / (time.time() - started) / 1e12, 1)
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def phase_ref() -> dict:
    """The reference model: each (method, dtype) on the GPU and, for the delicate ones, the CPU."""
    out = results["phases"].setdefault("ref", {})
    count = 2 if SMALL else 5
    common = ["domains=" + domains(count), "evaluation.max_tokens=" + ("1024" if SMALL else "16384")]
    if SMALL:
        common += ["calibration.nsamples=4", "calibration.seqlen=64", "evaluation.seqlen=64"]
    runs = [("copal", "float32", "gpu"), ("copal", "float32", "cpu"), ("sparsegpt", "float32", "gpu"),
            ("sparsegpt", "float32", "cpu"), ("wanda", "float32", "gpu"), ("copal", "bfloat16", "gpu"),
            ("copal", "bfloat16", "cpu")]
    if SMALL:  # the dry run: every code path of this script once, in CI's time
        runs = runs[:2]
    roots = {}
    for method, dtype, side in runs:
        tag = f"ref-{method}-{dtype}-{side}"
        if left() < 30:
            out[tag] = "skipped: budget"
            continue
        say("run", tag)
        try:
            device = GPU if side == "gpu" else "cpu"
            out[tag], roots[tag] = one_run(tag, common + [f"method={method}", f"dtype={dtype}", f"device={device}"])
            say(tag, out[tag])
        except Exception as error:  # record and go on: one failure must not hide the rest
            out[tag] = f"failed: {type(error).__name__}: {error}"
            say(tag, out[tag])
            traceback.print_exc()
        save()
    for method, dtype in (("copal", "float32"), ("sparsegpt", "float32"), ("copal", "bfloat16")):
        gpu_tag, cpu_tag = f"ref-{method}-{dtype}-gpu", f"ref-{method}-{dtype}-cpu"
        if gpu_tag in roots and cpu_tag in roots:
            compared = agreement(roots[gpu_tag], roots[cpu_tag])
            compared["avg_ppl_rel_diff"] = abs(out[gpu_tag]["avg_ppl"] / out[cpu_tag]["avg_ppl"] - 1)
            out[f"agreement-{method}-{dtype}"] = compared
            say("agreement", method, dtype, compared)
    if "ref-copal-float32-gpu" in roots and left() > 30:
        try:
            out["replay-gpu-step-on-cpu"] = replay_on("cpu", roots["ref-copal-float32-gpu"])
        except Exception as error:
            out["replay-gpu-step-on-cpu"] = f"failed: {type(error).__name__}: {error}"
            traceback.print_exc()
        say("replay", out["replay-gpu-step-on-cpu"])
    save()
    return out


def make_llama(path: Path, hidden: int, inter: int, layers: int, heads: int, kv: int) -> float:
    """A LLaMA of the given shape with random weights, in bf16, with the reference tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "models" / "reference")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(GPU):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if CUDA:
        torch.cuda.empty_cache()
    return time.time() - started


def floor_seconds(path: Path, nsamples: int, seqlen: int) -> float:
    """Two plain forwards (bf16, the model resident on the device) over nsamples sequences of seqlen."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(GPU).eval()
    batches = [torch.randint(0, model.config.vocab_size, (1, seqlen), device=GPU) for _ in range(nsamples)]
    with torch.no_grad():
        model(input_ids=batches[0], use_cache=False)
        sync()
        started = time.time()
        for _ in range(2):
            for batch in batches:
                model(input_ids=batch, use_cache=False)
        sync()
        seconds = time.time() - started
    del model
    if CUDA:
        torch.cuda.empty_cache()
    return seconds


SHAPES = {
    "scale": (dict(hidden=2048, inter=5632, layers=22, heads=32, kv=4), ("wanda", "copal", "sparsegpt"), 2, 64, 1024),
    "big": (dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32), ("wanda",), 1, 64, 1024),
}
if SMALL:
    SHAPES = {"scale": (dict(hidden=128, inter=344, layers=2, heads=4, kv=2), ("wanda", "copal", "sparsegpt"), 2, 4, 64),
              "big": (dict(hidden=128, inter=344, layers=2, heads=4, kv=4), ("wanda",), 1, 4, 64)}


def phase_shape(label: str) -> dict:
    shape, methods, count, nsamples, seqlen = SHAPES[label]
    path = WORK / "models" / label
    out = {"shape": shape, "calibration": f"{nsamples}x{seqlen}", "make_s": round(make_llama(path, **shape), 1)}
    out["floor_two_forwards_s"] = round(floor_seconds(path, nsamples, seqlen), 3)
    say(label, "floor", out["floor_two_forwards_s"], "s")
    results["phases"][label] = out
    save()
    for method in methods:
        if left() < (10 if SMALL else 45):
            out[method] = "skipped: budget"
            continue
        tag = f"{label}-{method}"
        say("run", tag)
        try:
            out[method], _ = one_run(tag, [f"model={path}", f"method={method}", f"device={GPU}", "dtype=bfloat16",
                                           "domains=" + domains(count), f"calibration.nsamples={nsamples}",
                                           f"calibration.seqlen={seqlen}", "calibration.batch_size=8",
                                           f"evaluation.seqlen={seqlen}", f"evaluation.max_tokens={8 * seqlen}"])
            out[method]["prune_over_floor"] = [round(s / out["floor_two_forwards_s"], 2) for s in out[method]["prune_s"]]
            say(tag, out[method]["prune_s"], "prune s;", out[method]["prune_over_floor"], "x floor")
        except Exception as error:
            out[method] = f"failed: {type(error).__name__}: {error}"
            say(tag, out[method])
            traceback.print_exc()
        save()
    return out


NEEDS = {"env": 30, "ref": 30, "scale": 10 if SMALL else 120, "big": 10 if SMALL else 150}  # seconds to start


def main() -> None:
    for phase in PHASES:
        if left() < NEEDS[phase]:
            results["phases"][phase] = "skipped: budget"
            continue
        say("phase", phase)
        try:
            if phase == "env":
                results["phases"]["env"] = phase_env()
            elif phase == "ref":
                phase_ref()
            else:
                results["phases"][phase] = phase_shape(phase)
        except Exception as error:
            results["phases"][phase] = f"failed: {type(error).__name__}: {error}"
            say(phase, results["phases"][phase])
            traceback.print_exc()
        save()
    say("done")


if __name__ == "__main__":
    main()
