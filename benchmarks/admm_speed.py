"""ADMM's schedule: how much of the layer-wise objective each mask chooser reaches, and
in how many seconds, on the Hessians a real continual run accumulated.

Every block asked for is pruned layer by layer from the step's stored Hessians (one
per distinct input: q/k/v stacked, gate/up stacked, as copal prunes them) and the
model's dense weights, by:

* `obs` — copal `mask: obs`, the default before: SparseGPT's OBS mask and update,
  then pcg8 from it;
* `admm` — copal's default as it ships: ADMM's 4 iterations (ρ 0.2, ×4 every 2), then
  pcg4 from ADMM's own sparse weights;
* `admm-8` — the default before it: 8 iterations (ρ 0.1, doubled every 2), then pcg8
  from W0 ⊙ M;
* `admm-60` — ADMM with 60 slowly growing iterations (ρ 0.1 × 1.1 each), issue 20's
  first schedule, then pcg8 from W0 ⊙ M: how much the short schedules give up.

For each, Σ over layers of ‖X(Ŵ − W0)ᵀ‖² / ‖XW0ᵀ‖² (from the stored H) and the
seconds. One thread, so that the seconds compare with copal's pass at --cpus 1.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/admm_speed.py \\
        --step reports/default/held-out-smollm2-copal-u70/steps/1 \\
        [--model data/models/smollm2-135m] [--blocks 2,10,18,26] [--out reports/admm_speed.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from copal.admm import ADMMOptions, admm_prune  # noqa: E402
from copal.masks import Structure  # noqa: E402
from copal.methods.copal import Copal  # noqa: E402
from copal.refit import PCGOptions, reconstruction_error, refit  # noqa: E402
from copal.state import StepState  # noqa: E402

STRUCTURES = {"50%": Structure(0.5), "70%": Structure(0.7), "2:4": Structure(0.5, (2, 4))}


def _admm_then_masked_pcg8(schedule: ADMMOptions):
    def choose(weight, hessian, structure):
        keep, _ = admm_prune(weight, hessian, structure, options=schedule)
        return keep, refit(weight, hessian, keep, "pcg", options=PCGOptions(iterations=8, warm_start="masked"))
    return choose


CHOOSERS = {"obs": Copal(mask="obs").prune, "admm": Copal(mask="admm").prune,
            "admm-8": _admm_then_masked_pcg8(ADMMOptions(iterations=8, rho=0.1, growth=2.0, rho_every=2)),
            "admm-60": _admm_then_masked_pcg8(ADMMOptions(iterations=60, rho=0.1, growth=1.1, rho_every=1))}


def input_groups(state: StepState, block: int) -> dict[str, list[str]]:
    """The block's layers by the Hessian they share (the step's aliases)."""
    aliases = state.aliases("sensitivity")
    groups: dict[str, list[str]] = {}
    for name in sorted(name for name in state.mask_names() if f".{block}." in name):
        groups.setdefault(aliases.get(name, name), []).append(name)
    return groups


def measure(step: Path, model, blocks: list[int]) -> dict:
    state = StepState(step)
    results = {label: {name: {"error": 0.0, "seconds": 0.0} for name in CHOOSERS} for label in STRUCTURES}
    for block in blocks:
        for owner, group in input_groups(state, block).items():
            hessian = state.sensitivity(owner).float()
            weight = torch.cat([model.get_submodule(name).weight.detach().float() for name in group])
            dense = (weight @ hessian * weight).sum(1).double()
            for label, structure in STRUCTURES.items():
                for name, choose in CHOOSERS.items():
                    started = time.perf_counter()
                    keep, fitted = choose(weight, hessian, structure)
                    results[label][name]["seconds"] += time.perf_counter() - started
                    results[label][name]["error"] += (reconstruction_error(fitted, hessian, weight) / dense).mean().item()
        print(f"block {block} done", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", type=Path, required=True, help="a recorded step with stored Hessians")
    parser.add_argument("--model", default="data/models/smollm2-135m")
    parser.add_argument("--blocks", default="2,10,18,26")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "admm_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    blocks = [int(block) for block in args.blocks.split(",")]
    results = measure(args.step, model, blocks)
    args.out.write_text(json.dumps({"step": str(args.step), "blocks": blocks, "results": results}, indent=1) + "\n")
    print("| structure | chooser | Σ relative error | seconds |\n|---|---|---:|---:|")
    for label, row in results.items():
        for name, value in row.items():
            print(f"| {label} | {name} | {value['error']:.4f} | {value['seconds']:.2f} |")


if __name__ == "__main__":
    main()
