"""The layer-wise pass and evaluation against their floors, in one process.

For each model, on one domain (builtin:docs):

* **forward**: a plain transformers forward of the decoder (`model.base_model`,
  no head) over the calibration batches. The pass's floor is two of them: one
  to collect statistics on the dense block, one to produce the pruned block's
  outputs.
* **pass**: each method's pruning pass (`copal.lifecycle.prune`: statistics,
  scores, masks, the step's state files) and its ratio to 2 × forward.
* **evaluation**: `copal.metrics.perplexity` tokens/s against a plain loop over
  the same windows at the same batch size (`model(...).logits`, then
  cross-entropy), and both PPLs (they must agree).
* **orchestration**: the same one-step run through the Prefect flow (MLflow and
  DVC included) and through the library alone; the difference is what
  Prefect, MLflow and DVC cost (the flow's one-time start included), and the
  per-step part of it (MLflow tracking and the DVC snapshot) is timed alone.

Ratios are within one run, so a busy machine moves them less than the seconds.

    python benchmarks/pass_speed.py [--models reference,smollm2] [--label after] \
        [--out reports/pass_speed.json] [--nsamples 16 --seqlen 128] [--eval-tokens 8192]

Results are merged into --out under --label (e.g. `before` / `after`), one
entry per model.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"reference": "data/models/reference", "smollm2": "data/models/smollm2-135m"}
# (method, regime): each method in the regime it is judged in, and wanda/copal in both.
PASSES = [("magnitude", "reprune"), ("wanda", "reprune"), ("wanda", "accumulate"), ("copal", "reprune"),
          ("copal", "accumulate"), ("sparsegpt", "reprune")]
# Ratios between passes the report keeps: name → (numerator, denominator).
RATIOS = {"copal_over_wanda_reprune": ("copal/reprune", "wanda/reprune"),
          "copal_over_wanda_accumulate": ("copal/accumulate", "wanda/accumulate"),
          "sparsegpt_over_wanda": ("sparsegpt/reprune", "wanda/reprune"),
          "copal_accumulate_over_reprune": ("copal/accumulate", "copal/reprune")}


def step_config(model: str, args, **overrides):
    from copal.config import build_config

    raw = {"name": "pass-speed", "model": str(ROOT / model), "domains": [args.domain],
           "method": "wanda", "regime": "reprune", "structure": "unstructured", "sparsity": 0.5,
           "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0,
                           "batch_size": args.batch_size},
           "evaluation": {"seqlen": args.eval_seqlen, "max_tokens": args.eval_tokens,
                          "batch_size": args.eval_batch_size},
           "device": args.device} | overrides
    return build_config(raw, "pass_speed")


def timed(function, *args) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def best_of(repeats: int, function, *args) -> dict:
    """The fastest of `repeats` calls: the least disturbed by whatever else runs."""
    runs = [timed(function, *args) for _ in range(repeats)]
    return {"seconds": min(run[0] for run in runs), "cpu_seconds": min(run[1] for run in runs),
            "result": runs[0][2]}


def plain_forward(model, batches) -> None:
    """One plain forward of the decoder (no head) over every calibration batch."""
    with torch.no_grad():
        for batch in batches:
            model.base_model(input_ids=batch, use_cache=False)


def plain_eval(model, windows, batch_size) -> float:
    """PPL by the plain loop: logits of a batch of windows, then cross-entropy."""
    import math

    total, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(windows), batch_size):
            batch = windows[first:first + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                    batch[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
    return math.exp(total / count)


def measure_passes(model_dir: str, args, scratch: Path) -> dict:
    """Each method's pruning pass (best of --repeats), and the plain decoder forward."""
    from copal import lifecycle
    from copal.continual import ContinualRun
    from copal.model import load_model

    resident, _ = load_model(str(ROOT / model_dir))  # the floor: plain transformers, every block in memory
    results = {}
    for method, regime in (tuple(item.split("/")) for item in args.passes.split(",")):
        run = ContinualRun(step_config(model_dir, args, method=method, regime=regime),
                           scratch / f"{method}-{regime}")

        def one_pass():  # the step's background writes included: a committed step waits for them too
            pending = lifecycle.start_step(run.session, 0)
            lifecycle.calibrate(run.session, pending)
            lifecycle.prune(run.session, pending)
            pending.writer.discard()  # before the next pass's writer clears the same partial directory

        if "forward" not in results:
            pending = lifecycle.start_step(run.session, 0)
            lifecycle.calibrate(run.session, pending)
            plain_forward(resident, pending.batches[:1])  # warm-up
            results["forward"] = best_of(args.repeats, plain_forward, resident, pending.batches)
            pending.writer.discard()
            one_pass()  # warm-up
        results[f"{method}/{regime}"] = best_of(args.repeats, one_pass)
        print(f"  pass {method}/{regime}: {results[f'{method}/{regime}']}", flush=True)
        del run
    return {key: {"seconds": value["seconds"], "cpu_seconds": value["cpu_seconds"]} for key, value in results.items()}


def measure_eval(model_dir: str, args, scratch: Path) -> dict:
    from copal.continual import ContinualRun
    from copal.model import load_model

    run = ContinualRun(step_config(model_dir, args), scratch / "eval")  # as a run evaluates (streaming blocks)
    resident, _ = load_model(str(ROOT / model_dir))  # the plain loop's model: every block in memory
    session = run.session
    windows = session.domains.windows(session.domains[0])
    session.execution.perplexity(windows[:2], session.device, args.eval_batch_size)  # warm-up
    library, plain = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine
        library.append(timed(session.execution.perplexity, windows, session.device, args.eval_batch_size))
        plain.append(timed(plain_eval, resident, windows, args.eval_batch_size))
    ppl, tokens = library[0][2]
    library_seconds, plain_seconds = min(r[0] for r in library), min(r[0] for r in plain)
    return {"tokens": tokens, "windows": len(windows), "batch_size": args.eval_batch_size,
            "library_seconds": library_seconds, "library_ppl": ppl,
            "plain_seconds": plain_seconds, "plain_ppl": plain[0][2],
            "library_tokens_per_s": tokens / library_seconds, "plain_tokens_per_s": tokens / plain_seconds,
            "ratio_to_plain": plain_seconds / library_seconds}


LIBRARY_TASKS = {"open-run", "dense-eval", "ingest", "calibrate", "sensitivity-and-masks", "evaluate", "record"}


def measure_orchestration(model_dir: str, args, scratch: Path) -> dict:
    """A copal/accumulate run over --orchestration-domains through the Prefect flow,
    as `copal run` does it (the run directory inside this DVC project, a warm
    MLflow store). Prefect's task runs say how long each library call took;
    the rest of the flow's wall time is orchestration."""
    import shutil

    from flows.api import prefect_settings

    prefect_settings()  # as the command line's main does, before Prefect is imported
    from prefect.server.api.server import SubprocessASGIServer

    from tasks.tracking import copal_experiment, mlflow_client, tracking_uri

    start = time.perf_counter()
    SubprocessASGIServer().start()  # what a flow would start; `copal run` boots it during preflight
    api_boot = time.perf_counter() - start
    copal_experiment(mlflow_client(tracking_uri()), tracking_uri())  # a store in use, not a new one

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.continual import continual_flow

    domains = args.orchestration_domains.split(",")
    config = step_config(model_dir, args, method="copal", regime="accumulate", domains=domains)
    out = ROOT / "runs" / f"pass-speed-{Path(model_dir).name}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    state = continual_flow(config, out, return_state=True)
    flow_seconds = time.perf_counter() - start
    state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    tasks: dict[str, float] = {}
    for task_run in runs:
        name = task_run.name.rsplit("-", 1)[0]
        tasks[name] = tasks.get(name, 0.0) + task_run.total_run_time.total_seconds()
    library = sum(seconds for name, seconds in tasks.items() if name in LIBRARY_TASKS)
    shutil.rmtree(out, ignore_errors=True)
    return {"steps": len(domains), "api_boot_seconds": api_boot, "flow_seconds": flow_seconds,
            "library_seconds": library, "task_seconds": tasks,
            "overhead_seconds_per_step": (flow_seconds - library) / len(domains),
            "overhead_fraction": (flow_seconds - library) / flow_seconds}


def save(report: dict, args, name: str, entry: dict) -> None:
    """Merge `entry` into the report file now, so a later failure loses nothing measured."""
    current = report.setdefault(args.label, {}).get(name, {})
    report[args.label][name] = current | entry
    args.out.write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="reference,smollm2")
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "pass_speed.json")
    parser.add_argument("--domain", default="builtin:docs")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-seqlen", type=int, default=256)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--orchestration-domains", default="builtin:docs,builtin:lexicon")
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    parser.add_argument("--passes", default=",".join(f"{method}/{regime}" for method, regime in PASSES),
                        help="comma list of method/regime passes to time")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: pass,eval,orchestration")
    args = parser.parse_args()

    from copal.allocator import limit_allocator_fragmentation

    limit_allocator_fragmentation()
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    services = tempfile.TemporaryDirectory()  # Prefect's and MLflow's stores, for the whole process
    os.environ.setdefault("PREFECT_HOME", str(Path(services.name) / "prefect"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path(services.name) / 'mlflow.db'}")
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.models.split(","):
        model_dir = MODELS.get(name, name)
        print(f"{name} ({model_dir})", flush=True)
        entry = {"threads": torch.get_num_threads(), "nsamples": args.nsamples, "seqlen": args.seqlen,
                 "batch_size": args.batch_size, "eval_tokens": args.eval_tokens, "eval_seqlen": args.eval_seqlen,
                 "repeats": args.repeats, "load_average": os.getloadavg()[0]}
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            if "pass" not in skip:
                passes = measure_passes(model_dir, args, scratch)
                forward = passes.pop("forward")
                entry["forward"] = forward
                entry["passes"] = {key: value | {"ratio_to_floor": value["seconds"] / (2 * forward["seconds"]),
                                                 "cpu_ratio_to_floor": value["cpu_seconds"] / (2 * forward["cpu_seconds"])}
                                   for key, value in passes.items()}
                for key, (slow, fast) in RATIOS.items():
                    if slow in passes and fast in passes:
                        entry[key] = passes[slow]["seconds"] / passes[fast]["seconds"]
            save(report, args, name, entry)
            if "eval" not in skip:
                entry["evaluation"] = measure_eval(model_dir, args, scratch)
                print(f"  evaluation: {entry['evaluation']}", flush=True)
                save(report, args, name, entry)
            if "orchestration" not in skip:
                entry["orchestration"] = measure_orchestration(model_dir, args, scratch)
                print(f"  orchestration: {entry['orchestration']}", flush=True)
        save(report, args, name, entry)
        print(json.dumps(entry, indent=1), flush=True)


if __name__ == "__main__":
    main()
