"""A GGUF causal LM → a plain Hugging Face model directory (float safetensors).

GGUF is how quantised models travel (llama.cpp, Ollama, pip-packaged models);
copal prunes float weights in HF directories. `import_gguf` reads the GGUF with
transformers' own GGUF support (which un-quantises every tensor and undoes
llama.cpp's q/k row permutation) and writes:

    OUT_DIR/config.json             the config, with no quantization_config
    OUT_DIR/generation_config.json
    OUT_DIR/model.safetensors       the un-quantised weights, in --dtype
    OUT_DIR/tokenizer.json, tokenizer_config.json, chat_template.jinja
                                    the tokenizer and chat template the GGUF's metadata describes
    OUT_DIR/gguf_source.json        where the weights came from (see `SOURCE_FILE`)

A model loaded from a GGUF refuses `save_pretrained` ("quantized with gguf and is
not serializable"), so its state dict is copied into a fresh model built from
the same config without the quantisation settings, with a strict key check.
Everything is written into a hidden sibling directory renamed into place when
complete: a crash leaves no half directory at OUT_DIR.
"""

import copy
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path

import torch

from copal.errors import InputError
from copal.model import DTYPES, feed_file

log = logging.getLogger(__name__)

#: The provenance record written next to the weights: the GGUF file's name, size and
#: SHA-256, its architecture and quantisation types, the dtype it was un-quantised to and
#: the transformers / gguf versions that did it. Enough to tell which file a converted
#: directory came from and to redo the conversion.
SOURCE_FILE = "gguf_source.json"

IMPORT_DTYPES = ("float32", "bfloat16")
GGUF_MAGIC = b"GGUF"


def sha256_file(path: Path) -> str:
    return feed_file(hashlib.sha256(), path).hexdigest()


def read_header(path: Path) -> dict:
    """The GGUF's metadata (string arrays left as counts); InputError unless `path` is a readable GGUF."""
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    with path.open("rb") as stream:
        magic = stream.read(4)
    if magic != GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (it does not start with the magic bytes 'GGUF')")
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        metadata, _ = read_gguf_metadata(str(path))
    except (ValueError, struct.error, UnicodeDecodeError, IndexError) as error:
        raise InputError(f"{path}: unreadable GGUF header ({_first_line(error)})") from None
    return metadata


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def gguf_config(path: Path, architecture: str):
    """The transformers config transformers derives from the GGUF's metadata, checked to be a
    causal LM it can build; InputError for an architecture transformers cannot load from GGUF."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError) as error:
        raise InputError(f"{path}: architecture {architecture!r}: transformers {transformers.__version__} "
                         f"cannot load it from GGUF as a causal LM ({_first_line(error)})") from None
    return config


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not empty; import-gguf needs a new or empty directory")


def _readable_like_new_files(folder: Path) -> None:
    """Give every file the permissions a plain new file gets (0666 less the umask):
    the weights are written through a private temporary file (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def import_gguf(gguf: Path, out: Path, dtype: str = "float32") -> dict:
    """Convert `gguf` into the HF directory `out`; returns the provenance record (plus timing)."""
    if dtype not in IMPORT_DTYPES:
        raise InputError(f"--dtype {dtype}: choose one of {', '.join(IMPORT_DTYPES)}")
    gguf, out = Path(gguf), Path(out)
    metadata = read_header(gguf)
    check_out_dir(out)
    architecture = metadata["general.architecture"]
    gguf_config(gguf, architecture)

    from transformers import AutoTokenizer

    started = time.perf_counter()
    log.info("importing %s (%s, %.1f MB)", gguf, architecture, gguf.stat().st_size / 1e6)
    source = _source_record(gguf, metadata, dtype)
    model = _dequantized_model(gguf, dtype)
    log.info("building the tokenizer from the GGUF's metadata")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _write_model_dir(out, model, tokenizer, source)
    return {**source, "architectures": model.config.architectures,
            "parameters": sum(p.numel() for p in model.parameters()),
            "bytes_written": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
            "seconds": round(time.perf_counter() - started, 1)}


def _source_record(gguf: Path, metadata: dict, dtype: str) -> dict:
    """What SOURCE_FILE records of the import: the GGUF file, its model and the converters' versions."""
    from importlib.metadata import version

    import transformers

    return {
        "file": gguf.name,
        "sha256": sha256_file(gguf),
        "bytes": gguf.stat().st_size,
        "architecture": metadata["general.architecture"],
        "name": metadata.get("general.name"),
        "dtype": dtype,
        "transformers": transformers.__version__,
        "gguf": version("gguf"),
    }


def _dequantized_model(gguf: Path, dtype: str):
    """The GGUF's model un-quantised to `dtype` by transformers' GGUF loader, moved into a
    model built from a clean config: no quantization_config, and no general.name (kept
    in SOURCE_FILE) as its name or path, so the saved directory is an ordinary HF model."""
    from transformers import AutoModelForCausalLM, GgufConfig

    log.info("un-quantising the weights to %s (transformers' GGUF loader; slow for big files)", dtype)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=DTYPES[dtype],
        quantization_config=GgufConfig(dequantize=True),
    )
    config = copy.deepcopy(loaded.config)
    for attribute in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = DTYPES[dtype]
    fresh = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    return fresh


def _write_model_dir(out: Path, model, tokenizer, source: dict) -> None:
    """Model, tokenizer and SOURCE_FILE into `out`, all or nothing: written into a
    partial folder beside it that replaces `out` (empty, checked before) at the end."""
    partial = out.with_name(f".{out.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an import that crashed
    try:
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        (partial / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
        _readable_like_new_files(partial)
        if out.exists():
            out.rmdir()  # empty, checked above
        partial.replace(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
