"""Seconds to encode one copal step's statistic in a compact state format, now and at
an earlier commit, and whether the two give the same bytes.

    python benchmarks/state_encode_speed.py \
        --step reports/smollm2/cells/copal-accumulate-u50/steps/5 --against 43434ac

--step is a step folder stored in float32 state (the SmolLM2 grid's cells are): every
2-D statistic in its sensitivity/ files is encoded with this checkout's codec and with
copal/state.py as it was at --against (loaded from git, nothing checked out), on one
thread. Writes reports/state_encode_speed.json.
"""

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from copal.codecs import CODECS

ROOT = Path(__file__).resolve().parent.parent


def codec_at(commit: str, name: str):
    source = subprocess.run(["git", "show", f"{commit}:copal/state.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    namespace: dict = {}
    exec(compile(source, f"{commit}:copal/state.py", "exec"), namespace)
    return namespace["CODECS"][name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=Path, required=True)
    parser.add_argument("--against", required=True, help="git commit whose encoder to compare with")
    parser.add_argument("--format", default="log6L")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "state_encode_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    statistics = {name: value for file in sorted((args.step / "sensitivity").glob("*.safetensors"))
                  for name, value in load_file(file).items() if value.dim() == 2}
    if not statistics:
        raise SystemExit(f"{args.step}/sensitivity holds no float32 2-D statistic")
    codecs = {"now": CODECS[args.format], args.against: codec_at(args.against, args.format)}
    seconds = {label: 0.0 for label in codecs}
    identical = 0
    for name, value in statistics.items():
        encoded = {}
        for label, codec in codecs.items():
            start = time.perf_counter()
            encoded[label] = codec.encode(name, value)
            seconds[label] += time.perf_counter() - start
        now, then = encoded.values()
        identical += all(torch.equal(now[key], then[key]) for key in now)
    result = {"step": str(args.step), "format": args.format, "layers": len(statistics),
              "values": sum(value.numel() for value in statistics.values()),
              "seconds": {label: round(value, 2) for label, value in seconds.items()},
              "identical_layers": identical}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
