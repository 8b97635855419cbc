#!/usr/bin/env bash
# Prepares what benchmarks/gpu_check.sh needs on a bare CUDA image, in benchmarks/.gpu/
# (git-ignored; pass it to the GPU machine as a carried path):
#   wheels/  the project's pins of what such an image may lack or have older: pydantic and
#            its parts (pydantic-core for CPython 3.11-3.13), transformers and its hub/tokenizer
#            libraries (about 25 MB)
#   jsonl/   the builtin domains' held-out documents (never the reference model's training
#            part), 1.5 MB of text each, so that no Debian corpus is needed there
# Run with the project's venv (make setup).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/.gpu
mkdir -p "$out/wheels"
pin() { grep -i "^$1==" requirements.txt | head -1; }
pip=(.venv/bin/pip download -q --disable-pip-version-check --no-deps -d "$out/wheels")
"${pip[@]}" "$(pin pydantic)" "$(pin transformers)" \
    "annotated-types==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("annotated-types"))')" \
    "typing-inspection==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("typing-inspection"))')" \
    "typing-extensions==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("typing-extensions"))')" \
    "huggingface-hub==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("huggingface-hub"))')"
core="pydantic-core==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("pydantic-core"))')"
for python in 3.11 3.12 3.13; do
    "${pip[@]}" --only-binary=:all: --python-version "$python" --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 "$core" "$(pin tokenizers)" "$(pin safetensors)"
done
.venv/bin/python - "$out/jsonl" <<'PY'
import json, sys
from pathlib import Path

from copal.corpora import BUILTIN_NAMES, iter_builtin
from copal.splits import BUILTIN_FRACTIONS, TRAIN, split_of

folder, limit = Path(sys.argv[1]), 1_500_000
folder.mkdir(parents=True, exist_ok=True)
for name in BUILTIN_NAMES:
    size = 0
    with open(folder / f"{name}.jsonl", "w") as handle:
        for doc_id, text in iter_builtin(name):
            if split_of(doc_id, BUILTIN_FRACTIONS) == TRAIN or not text.strip():
                continue
            handle.write(json.dumps({"text": text}) + "\n")
            size += len(text.encode())
            if size >= limit:
                break
    print(f"{folder / name}.jsonl: {size} bytes of held-out text")
PY
du -sh "$out"
