"""A recorded step's bytes against the fp16 bytes of the model's prunable weights
(issue 20's target: at most 0.5x), as stored and with its sym16 Hessians re-stored
as sym16z (the same float16 half, deflated: what `state.hessian: sym16z` writes).

The prunable weights are counted from the step's masks (one mask per prunable layer,
its weight's shape). Each sym16 block file is re-stored exactly as the writer stores
a sym16z one (`SymmetricHalf16Zip.store`, then safetensors), and the decoded Hessians
are checked to be equal.

    python benchmarks/state_bytes.py reports/smollm2/cells/copal-accumulate-u70-hessian/steps/1 \\
        [--out reports/state_bytes-smollm2.json]
"""

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from copal.codecs import FORMAT_KEY, HESSIAN_CODECS, STATE_VERSION, codec_for


def prunable_weights(step: Path) -> int:
    with safe_open(str(step / "masks.safetensors"), "pt") as handle:
        shapes = json.loads(handle.metadata()["shapes"])
    return sum(math.prod(shape) for shape in shapes.values())


def restored_sym16z(block: Path, scratch: Path) -> int:
    """The block file's bytes once its sym16 Hessians are stored as sym16z (unchanged
    if it holds another format)."""
    with safe_open(str(block), "pt") as handle:
        label = (handle.metadata() or {}).get(FORMAT_KEY)
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if label is None or codec_for(label).name != "sym16":
        return block.stat().st_size
    plain, zipped = codec_for(label), HESSIAN_CODECS["sym16z"]
    stored = zipped.store(tensors)
    for name in {key.rsplit(".", 1)[0] for key in tensors}:
        assert torch.equal(zipped.decode(name, stored.__getitem__), plain.decode(name, tensors.__getitem__)), name
    target = scratch / block.name
    save_file(stored, str(target), metadata={FORMAT_KEY: f"sym16z/v{STATE_VERSION}"})
    return target.stat().st_size


def measure(step: Path) -> dict:
    files = [file for file in step.rglob("*") if file.is_file()]
    stored = sum(file.stat().st_size for file in files)
    with tempfile.TemporaryDirectory() as scratch:
        blocks = [file for file in files if file.parent.name == "sensitivity" and file.suffix == ".safetensors"]
        zipped = stored - sum(file.stat().st_size for file in blocks) + sum(
            restored_sym16z(block, Path(scratch)) for block in blocks)
    fp16 = 2 * prunable_weights(step)
    return {"step": str(step), "prunable_fp16_bytes": fp16, "stored_bytes": stored,
            "stored_over_fp16": stored / fp16, "sym16z_bytes": zipped, "sym16z_over_fp16": zipped / fp16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", type=Path, nargs="+", help="recorded step folders (RUN/steps/K)")
    parser.add_argument("--out", type=Path, help="write the measurements here as JSON")
    args = parser.parse_args()
    results = [measure(step) for step in args.steps]
    for result in results:
        print(f"{result['step']}: {result['stored_bytes'] / 1e6:.1f} MB stored = {result['stored_over_fp16']:.3f}x, "
              f"sym16z {result['sym16z_bytes'] / 1e6:.1f} MB = {result['sym16z_over_fp16']:.3f}x "
              f"the fp16 prunable bytes ({result['prunable_fp16_bytes'] / 1e6:.1f} MB)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
