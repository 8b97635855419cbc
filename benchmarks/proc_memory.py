"""Resident memory of this process from /proc (Linux), stdlib only, so that both
the project's venv and the peer tool's venv (benchmarks/.venv-peers) can use it."""


def status_mb(key: str) -> float:
    """A /proc/self/status figure in MB: VmRSS (now) or VmHWM (peak since the last reset)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":")) / 1024


def reset_peak() -> None:
    """VmHWM := VmRSS from now on (Linux: "5" to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
