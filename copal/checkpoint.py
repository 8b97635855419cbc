"""A safetensors checkpoint read without loading it: headers checked against the
file sizes, the index of every tensor (file, dtype, shape), the stored dtype.

Used wherever a model directory is read piecewise: the model's preflight
(copal.model), the dense weights W0, and streaming blocks (copal.streaming)."""

import json
import math
import struct
from pathlib import Path

import torch

from copal.errors import InputError

_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def read_header(file: Path) -> dict:
    """A safetensors file's header, checked against the file's size: a truncated
    or corrupt file is an InputError naming it, before anything reads its tensors."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise ValueError("shorter than a header")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(stream.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        if 8 + length + end != size:
            raise ValueError(f"{size} bytes, the header describes {8 + length + end}: truncated")
        return header
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as error:
        raise InputError(f"{file}: corrupt weights file ({error})") from None


def checkpoint_index(folder: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Tensor name → (file, safetensors dtype, shape) over every *.safetensors file of a model directory."""
    index = {}
    for file in sorted(folder.glob("*.safetensors")):
        for key, entry in read_header(file).items():
            if key != "__metadata__":
                index[key] = (file, entry["dtype"], tuple(entry["shape"]))
    return index


def stored_dtype(index) -> torch.dtype | None:
    """The floating dtype most of the checkpoint's values are stored in."""
    counts: dict[str, int] = {}
    for _, dtype, shape in index.values():
        if dtype in _SAFETENSORS_DTYPES:
            counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
    return _SAFETENSORS_DTYPES[max(counts, key=counts.get)] if counts else None
