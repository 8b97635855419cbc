"""The environment that decides a step's bits, recorded with every step.

Floating-point sums come out in an order that depends on the torch build, the
BLAS library, the CPU kernels torch and BLAS dispatch to (the instruction set, the
CPU model, MKL's kernel settings), the number of threads that split the work, the
device and the dtype. A step records
these facts (`environment`); a replay pins the recorded thread count
(`torch_threads`) and names the facts that still differ (`differences`), the
ones no setting here can undo (another CPU kernel, CUDA instead of the CPU).
"""

import os
import platform
import re
from functools import lru_cache

import torch

def _blas() -> str:
    """The BLAS torch was built with, and its version where torch says it."""
    config = torch.__config__.show()
    info = re.search(r"BLAS_INFO=(\w+)", config)
    name = info.group(1) if info else "unknown"
    version = re.search(r"Math Kernel Library Version ([\w.\-]+)", config) if name == "mkl" else None
    return f"{name} {version.group(1)}" if version else name


# Settings that change which kernels MKL dispatches to, where the user set them.
_KERNEL_VARIABLES = ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "MKL_DEBUG_CPU_TYPE")


@lru_cache(maxsize=1)
def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo): two CPUs with one instruction set
    may still take different BLAS kernels (MKL picks its own by the CPU)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device, dtype: str) -> dict:
    """This process's facts for a step computed on `device` in `dtype`."""
    device = torch.device(device)
    facts = {"torch": torch.__version__, "blas": _blas(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "cpu": _cpu_model(), "machine": platform.machine(), "threads": torch.get_num_threads(),
             "device": device.type, "dtype": dtype}
    kernels = {name: os.environ[name] for name in _KERNEL_VARIABLES if os.environ.get(name)}
    if kernels:
        facts["kernel_settings"] = kernels
    if device.type == "cuda":
        facts["device"] = f"cuda {torch.cuda.get_device_name(device)}"
        facts["cuda"] = torch.version.cuda
    return facts


def differences(recorded: dict | None, current: dict) -> dict[str, tuple]:
    """{fact: (recorded, now)} for the facts other than the thread count that differ.
    A step recorded before copal kept its environment differs in `environment` itself."""
    if recorded is None:
        return {"environment": ("not recorded", "recorded now")}
    keys = [key for key in dict.fromkeys([*recorded, *current]) if key != "threads"]
    return {key: (recorded.get(key), current.get(key)) for key in keys if recorded.get(key) != current.get(key)}
