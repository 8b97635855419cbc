"""Time per step on the reference model, block streaming vs the whole model resident.

Issue 10's speed condition: streaming may not make a step more than 10 % slower.
Two copal/accumulate steps (docs, then code; the demo's calibration, 16k evaluation
tokens per domain) per mode, the modes interleaved, one thread; the PPLs must agree.

    python benchmarks/streaming_speed.py [--repeats 2] [--out reports/streaming_speed.json]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from copal.config import DEMO_CONFIG, load_config
from copal.continual import ContinualRun


def one_run(streaming: bool) -> dict:
    config = load_config(DEMO_CONFIG, ["domains=[builtin:docs,builtin:code]", "evaluation.max_tokens=16384"])
    with tempfile.TemporaryDirectory() as root:
        wall, cpu = time.perf_counter(), time.process_time()
        run = ContinualRun(config, Path(root), streaming=streaming)
        run.evaluator.dense_ppl()
        steps = [run.step(0), run.step(1)]
        return {"streaming": streaming, "wall_seconds": time.perf_counter() - wall,
                "cpu_seconds": time.process_time() - cpu,
                "step_seconds": [step.seconds for step in steps],
                "prune_seconds": [step.prune_seconds for step in steps], "ppl": steps[-1].ppl}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("reports/streaming_speed.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = [one_run(streaming) for _ in range(args.repeats) for streaming in (True, False)]
    best = {mode: min(sum(r["step_seconds"]) for r in runs if r["streaming"] == mode) for mode in (True, False)}
    result = {"command": "python benchmarks/streaming_speed.py", "threads": 1, "runs": runs,
              "best_step_seconds": {"streaming": best[True], "resident": best[False]},
              "streaming_over_resident": best[True] / best[False],
              "same_ppl": len({json.dumps(r["ppl"], sort_keys=True) for r in runs}) == 1}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return result


if __name__ == "__main__":
    main()
