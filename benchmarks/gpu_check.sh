#!/usr/bin/env bash
# benchmarks/gpu_check.py on a GPU machine that has only a CUDA image's torch (and maybe an
# older transformers): the wheels benchmarks/gpu_prepare.sh put in benchmarks/.gpu/wheels are
# unpacked into a folder first on PYTHONPATH (a wheel is a zip archive; no pip or network
# needed), those of another CPython left out. Usage: gpu_check.sh OUT [BUDGET seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT [BUDGET]}
site=$(mktemp -d)
python3 - "$site" benchmarks/.gpu/wheels/*.whl <<'PY'
import importlib.metadata as metadata
import sys
import zipfile

site, wheels = sys.argv[1], sys.argv[2:]
tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
# The image's own copy wins where it has one, except for these, which must be the project's pins.
PINNED = ("pydantic", "pydantic-core", "typing-extensions", "typing-inspection", "annotated-types", "transformers")
for wheel in wheels:
    name = wheel.rsplit("/", 1)[-1]
    dist, version = name.split("-")[:2]
    dist = dist.replace("_", "-").lower()
    if "-cp3" in name and f"-{tag}-" not in name and "-abi3-" not in name:
        continue  # compiled for another CPython
    try:
        installed = metadata.version(dist)
    except metadata.PackageNotFoundError:
        installed = None
    if installed == version or (installed and dist not in PINNED):
        print(f"gpu_check: {dist} {installed} from the image")
        continue
    zipfile.ZipFile(wheel).extractall(site)
    print(f"gpu_check: {dist} {version} unpacked (image: {installed})")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH="$site:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false BUDGET=${2:-420} \
    python3 benchmarks/gpu_check.py "$out"
