"""Load any Hugging Face causal LM and find what gets pruned in it.

Prunable = every `nn.Linear` or GPT-2 style `Conv1D` inside the decoder blocks.
Weights are always handled in (out_features, in_features) orientation here; a
Conv1D stores the transpose, which `weight_matrix` hides.
"""

import functools
import itertools
import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from copal.checkpoint import checkpoint_index, read_header
from copal.errors import EnvironmentFault, InputError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name}: CUDA is not available on this machine")
    return torch.device(name)


@contextmanager
def torch_threads(threads: int | None, restore: bool = True):
    """torch's thread count pinned to `threads` (None: left alone). `restore`: set it back
    afterwards; not on a cluster worker whose process other runs share at the same time
    (each sets its own: putting back what it found would change theirs mid-run)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads and restore:
            torch.set_num_threads(before)


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: not a model directory (no config.json)")
    if not list(path.glob("*.safetensors")):
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise InputError(f"{path}: only pickle weights (*.bin); copal loads safetensors only")
        raise InputError(f"{path}: no model weights (*.safetensors)")
    for file in sorted(path.glob("*.safetensors")):  # headers only: a truncated shard fails here, in seconds
        read_header(file)


def check_model_location(location: str) -> None:
    """A local model directory must exist and hold a config and safetensors weights."""
    path = Path(location)
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{location}: not a directory")
        _check_model_dir(path)
    elif location.startswith((".", "/")) or location.count("/") > 1:
        raise InputError(f"{location}: model directory not found")
    else:
        _check_hub_id(location)


def _check_hub_id(location: str) -> None:
    """A hub id that is not cached must exist on a hub we can reach: asked once, so an
    unreachable hub is one line at once, not minutes of the download client's retries."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(location, "config.json"), str):
            return
        HfApi().model_info(location, timeout=15)
    except (RepositoryNotFoundError, HFValidationError):
        raise InputError(f"{location}: not a local model directory, nor a model on the Hugging Face hub") from None
    except Exception as error:  # the hub client's transport errors have many types
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise EnvironmentFault(f"{location}: the Hugging Face hub cannot be reached ({first_line}); give a local "
                               f"model directory, or download it first") from None


def load_tokenizer(location: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_location(location)
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"{location}: cannot load tokenizer ({first_line})") from None


def check_architecture(location: str, trust_remote_code: bool = False) -> None:
    """The model's architecture has decoder blocks to prune: checked on an empty
    (meta-device) instance built from the config, without reading any weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"{location}: not a causal LM this library can load ({first_line})") from None
    find_blocks(skeleton)


def load_model(location: str, dtype: str = "float32", trust_remote_code: bool = False):
    """(model, tokenizer) from a local HF directory or a hub id, in eval mode on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_location(location)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=DTYPES[dtype], use_safetensors=True, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"{location}: cannot load model ({first_line})") from None
    except Exception as error:  # safetensors raises its own error type for corrupt files
        if type(error).__name__ != "SafetensorError":
            raise
        raise InputError(f"{location}: corrupt weights file ({error})") from None
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def weights_fingerprint(location: str) -> str:
    """SHA-256 over a local checkpoint's safetensors files ("" for a hub id):
    what a recorded mask is only valid on top of. Hashed once per process for
    the same files (name, size and mtime), since every step records it."""
    path = Path(location)
    if not path.is_dir():
        return ""
    files = sorted(path.glob("*.safetensors"))
    return _hash_files(tuple((str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns) for file in files))


@functools.lru_cache(maxsize=8)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for file, _, _ in files:
        digest.update(Path(file).name.encode() + b"\0")
        feed_file(digest, Path(file))
    return digest.hexdigest()


def feed_file(digest, path: Path):
    """Stream a file's bytes into a hashlib digest, 1 MB at a time; returns the digest."""
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList of same-typed modules holding the most parameters."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) != 1:
                continue
            size = sum(p.numel() for p in module.parameters())
            if size > best_size and any(prunable_linears(child) for child in module):
                best, best_size = (name, module), size
    if best is None:
        raise InputError(f"{type(model).__name__}: no decoder blocks with linear layers found")
    return best


def prunable_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules of one block, by name relative to the block."""
    return {name: module for name, module in block.named_modules() if isinstance(module, (nn.Linear, Conv1D))}


def all_prunable(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable module of the model, by full module name, in block order."""
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{index}.{name}": module
            for index, block in enumerate(blocks) for name, module in prunable_linears(block).items()}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out_features, in_features); a view, so writes go through."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    with torch.no_grad():
        weight_matrix(module).copy_(matrix)


def move_non_block_tensors(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Put embeddings, final norm, head, rotary tables… on `device`; blocks stay put."""
    in_blocks = {id(t) for t in itertools.chain(blocks.parameters(), blocks.buffers())}
    for module in model.modules():
        for parameter in module._parameters.values():
            if parameter is not None and id(parameter) not in in_blocks:
                parameter.data = parameter.data.to(device)
        for key, buffer in module._buffers.items():
            if buffer is not None and id(buffer) not in in_blocks:
                module._buffers[key] = buffer.to(device)


class DenseWeights:
    """The dense weights W0 of the prunable layers, read back on demand.

    Pruning overwrites weights in place, and every regime but `sequential` needs
    W0 again at the next step. Keeping a second copy of the model would double
    memory, so for a local safetensors checkpoint the weights are read lazily
    from the files; otherwise (hub models, renamed keys) we keep a CPU copy.
    """

    def __init__(self, model: nn.Module, location: str):
        self._modules = all_prunable(model)
        self._files: dict[str, Path] = {}
        self._copies: dict[str, torch.Tensor] = {}
        folder = Path(location)
        index = {key: entry[0] for key, entry in checkpoint_index(folder).items()} if folder.is_dir() else {}
        for name, module in self._modules.items():
            key = f"{name}.weight"
            if key in index:
                self._files[name] = index[key]
            else:
                self._copies[name] = weight_matrix(module).detach().clone()
        if self._copies:
            log.info("keeping an in-memory copy of %d dense weight(s)", len(self._copies))

    def get(self, name: str) -> torch.Tensor:
        """W0 of one layer as (out, in), in the model's dtype, on the CPU."""
        if name in self._copies:
            return self._copies[name].clone()
        from safetensors import safe_open

        module = self._modules[name]
        try:
            with safe_open(str(self._files[name]), "pt") as handle:
                tensor = handle.get_tensor(f"{name}.weight")
        except Exception as error:  # safetensors raises its own error type for corrupt files
            if type(error).__name__ != "SafetensorError" and not isinstance(error, OSError):
                raise
            raise InputError(f"{self._files[name]}: corrupt weights file ({error})") from None
        tensor = tensor.to(module.weight.dtype)
        return tensor.t().contiguous() if isinstance(module, Conv1D) else tensor
