"""How far a replay drifts when the environment changes: the evidence behind
copal.replay's tolerance (MIN_LAYER_AGREEMENT, MAX_PPL_CHANGE).

Records a two-domain run per method on the reference model (accumulate regime,
the recording process's threads), then replays step 2 in fresh processes whose
environment differs from the record's:

* `threads 1`: OMP_NUM_THREADS=1 (replay pins the recorded count: must be bit-identical);
* `aten default`: ATEN_CPU_CAPABILITY=default (torch's generic CPU kernels instead of
  AVX2/AVX-512: what another CPU generation gives);
* `mkl avx`: MKL_ENABLE_INSTRUCTIONS=AVX (MKL's AVX kernels instead of its best:
  another CPU's BLAS kernels);
* both of the last two.

For each: layers not bit-identical, the lowest per-layer mask agreement, the
own-domain PPL change, and the verdict.

    python benchmarks/replay_spread.py [--out reports/replay_spread.json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("copal", "wanda", "sparsegpt")
VARIANTS = {
    "threads 1": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "aten default": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl avx": {"MKL_ENABLE_INSTRUCTIONS": "AVX"},
    "aten default + mkl avx": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX"},
}
STDLIB = Path(os.__file__).parent

RECORD = """
import sys
from pathlib import Path
from copal.config import build_config
from copal.continual import ContinualRun
import json
ContinualRun(build_config(json.loads(sys.argv[1])), Path(sys.argv[2])).run()
"""

REPLAY = """
import json, sys
from pathlib import Path
from copal.continual import ContinualRun
from copal.rundir import RunDir
config, _ = RunDir(Path(sys.argv[1])).read_config()
result = ContinualRun(config, Path(sys.argv[1]), readonly=True).replay(2)
print(json.dumps({"facts": {k: list(v) for k, v in result.facts.items()}, "threads": result.threads,
                  "not_bit_identical": len(result.differing), "layers": len(result.agreement),
                  "lowest_agreement": min(result.agreement.values()), "ppl": result.ppl,
                  "ppl_change": result.ppl_change, "verified": result.verified}))
"""


def config(method: str) -> dict:
    return {"name": f"spread-{method}", "model": str(ROOT / "data/models/reference"),
            "domains": [f"collections=text:{STDLIB / 'collections/__init__.py'}",
                        f"argparse=text:{STDLIB / 'argparse.py'}"],
            "method": method, "regime": "accumulate", "calibration": {"nsamples": 8, "seqlen": 128, "seed": 0},
            "evaluation": {"seqlen": 128, "max_tokens": 2048}, "device": "cpu"}


def python(code: str, *args: str, env: dict | None = None) -> str:
    environ = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    done = subprocess.run([sys.executable, "-c", code, *args], env=environ, capture_output=True, text=True,
                          check=True)
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "reports/replay_spread.json"))
    args = parser.parse_args()
    results = {"methods": {}}
    with tempfile.TemporaryDirectory() as scratch:
        os.environ.setdefault("COPAL_DATA_DIR", str(Path(scratch) / "arrow"))
        for method in METHODS:
            run_dir = Path(scratch) / method
            began = time.perf_counter()
            python(RECORD, json.dumps(config(method)), str(run_dir))
            record = json.loads((run_dir / "steps/2/step.json").read_text())
            results["methods"][method] = {"recorded": record["environment"], "record_seconds":
                                          time.perf_counter() - began, "replays": {}}
            for name, env in VARIANTS.items():
                replay = json.loads(python(REPLAY, str(run_dir), env=env).strip().splitlines()[-1])
                results["methods"][method]["replays"][name] = replay
                print(method, name, json.dumps(replay), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
