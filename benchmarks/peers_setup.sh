#!/usr/bin/env bash
# llm-compressor's own venv for benchmarks/peers.py: benchmarks/.venv-peers (git-ignored).
#
# llmcompressor 0.14 pins transformers <=5.17 and compressed-tensors 0.19, older than the
# project's transformers, so it never goes into the project's .venv. torch is installed
# first and pinned to 2.13.0 (the CPU build pip takes from this machine's local wheel
# store; a looser pin pulls a multi-GB CUDA build), then llmcompressor under
# benchmarks/peers-constraints.txt (every package of the venv, exact), and the versions
# are checked afterwards. Safe to rerun: does nothing when the venv is already right.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PEERS_VENV:-benchmarks/.venv-peers}
CONSTRAINTS=benchmarks/peers-constraints.txt
LLMCOMPRESSOR=0.14.0.1
PYTHON=${PYTHON:-python3}

check() {
    "$VENV/bin/python" - "$LLMCOMPRESSOR" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

wanted = {"llmcompressor": sys.argv[1], "torch": "2.13.0", "transformers": "5.17.0", "compressed-tensors": "0.19.0"}
try:
    found = {name: version(name) for name in wanted}
except PackageNotFoundError as missing:
    sys.exit(f"peers_setup: {missing} not installed")
wrong = {name: found[name] for name in wanted if found[name].split("+")[0] != wanted[name]}
if wrong:
    sys.exit(f"peers_setup: wrong versions {wrong}, wanted {wanted}")
print("peers_setup: ready:", ", ".join(f"{name} {found[name]}" for name in wanted))
PY
}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
if ! check >/dev/null 2>&1; then
    echo "peers_setup: installing torch 2.13.0 (CPU), then llmcompressor $LLMCOMPRESSOR into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
    "$VENV/bin/pip" install -q --disable-pip-version-check -c "$CONSTRAINTS" "llmcompressor==$LLMCOMPRESSOR"
fi
check
