"""Downstream accuracy: lm-evaluation-harness tasks run on an in-memory model.

The model is evaluated as it is in memory (dense, or pruned by a step), through
lm-eval's `HFLM(pretrained=model, tokenizer=…)`; tasks come from lm-eval's
`TaskManager`: copal's builtin tasks (`copal.lm_tasks`, found without an include
path), the YAMLs under an include path, and lm-eval's own tasks (which
download their data: online only).

Metric names are lm-eval's result keys with the `,none` filter suffix removed
(`acc,none` → `acc`, `acc_stderr,none` → `acc_stderr`); a metric under another
filter keeps its suffix (`exact_match,strict-match`). Only numeric values are
kept (a stderr lm-eval could not compute is left out), and lm-eval's
`sample_len` (an item count, not a metric) is reported under `task_items`.

Each evaluated task is also named by its items: `{"items": N, "sha256": …}`,
the SHA-256 of the documents evaluated, one canonical JSON line each (keys
sorted; for copal's builtin tasks, the SHA-256 of the JSONL they were written
to when no limit cuts them).
"""

import copy
import hashlib
import json
import logging
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from copal.errors import InputError
from copal.lm_tasks import BUILTIN_TASKS, TASK_DIR
from copal.tokens import text_start

# lm-eval's own loggers: its INFO lines and its warning about a model passed as an object.
_LM_EVAL_LOGGERS = ("lm_eval", "lm-eval")


def parse_task_list(text: str) -> list[str]:
    """`NAME[,NAME…]` → names (blanks dropped, order kept, duplicates removed)."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise InputError(f"--tasks {text!r}: no task names")
    return names


@contextmanager
def _quiet():
    saved = {name: logging.getLogger(name).level for name in _LM_EVAL_LOGGERS}
    for name in _LM_EVAL_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def _include_paths(include_path: Path | str | None) -> tuple[str, ...]:
    if include_path is None:
        return (str(TASK_DIR),)
    path = Path(include_path)
    if not path.exists():
        raise InputError(f"{path}: task include path not found")
    if not path.is_dir():
        raise InputError(f"{path}: task include path is not a folder (give the folder of the task YAMLs)")
    # Later paths override earlier ones: a user's task of the same name wins over a builtin.
    return (str(TASK_DIR), str(path.resolve()))


def task_manager(tasks: list[str], include_path: Path | str | None = None):
    """A TaskManager that knows every name in `tasks`: copal's and the include
    path's tasks only (quick) when that suffices, else with lm-eval's own (their
    index takes seconds to build). An unknown name is an InputError."""
    if not tasks:
        raise InputError("no tasks given")
    paths = _include_paths(include_path)
    manager = _manager(paths, False)
    if all(name in manager.all_tasks for name in tasks):
        return manager
    manager = _manager(paths, True)
    for name in tasks:
        if name not in manager.all_tasks:
            where = f", nor under {include_path}" if include_path is not None else ""
            raise InputError(f"{name}: unknown task: not a copal task ({', '.join(BUILTIN_TASKS)}), "
                             f"nor one of lm-eval's{where}")
    return manager


def check_tasks(tasks: list[str], include_path: Path | str | None = None) -> None:
    """Fail fast (InputError) on an unknown task name or a missing include path."""
    task_manager(tasks, include_path)


def _items(task, limit: int | None) -> dict:
    digest = hashlib.sha256()
    count = 0
    for doc in task.eval_docs:
        if limit is not None and count >= limit:
            break
        digest.update(json.dumps(dict(doc), sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
        count += 1
    return {"items": count, "sha256": digest.hexdigest()}


def _load(manager, name: str) -> tuple[list, dict]:
    """The objects simple_evaluate takes for `name` (a group stays one object, so
    lm-eval aggregates it), and its leaf tasks."""
    try:
        loaded = manager.load([name])
    except InputError:
        raise
    except Exception as error:  # datasets and the hub raise many types; all mean "cannot read this task"
        if name in BUILTIN_TASKS:
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"{name}: cannot load the task ({first_line})") from None
    if name in loaded["groups"]:
        return [loaded["groups"][name]], loaded["tasks"]
    return list(loaded["tasks"].values()), loaded["tasks"]


def _metric_name(key: str) -> str:
    return key.removesuffix(",none")


def evaluate_tasks(model: nn.Module, tokenizer, tasks: list[str], include_path: Path | str | None = None,
                   device: torch.device | str = "cpu", batch_size: int = 8, limit: int | None = None) -> dict:
    """`{"tasks": {name: {metric: value}}, "task_items": {name: {"items", "sha256"}}}`
    for `tasks` (zero-shot, lm-eval's defaults otherwise) on `model` as it is now.
    `limit`: at most this many items per task (lm-eval's --limit: the first ones)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit < 1:
        raise InputError(f"task limit {limit}: must be at least 1")
    manager = task_manager(tasks, include_path)
    with _quiet():
        objects, leaves = [], {}
        for name in tasks:
            built, leaf_tasks = _load(manager, name)
            objects += built
            leaves |= leaf_tasks
        items = {name: _items(task, limit) for name, task in leaves.items()}
        model.to(device)
        try:
            # A copy of the tokenizer: HFLM may set its pad token, and the caller's stays as it was.
            # A tokenizer that starts texts with a BOS gets it here too, as in calibration and
            # perplexity (copal.tokens); one that adds none is left to lm-eval's default.
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                      add_bos_token=True if text_start(tokenizer).ids else None)
            # No seeds: lm-eval would otherwise reseed the process's random, numpy and torch
            # generators; zero-shot multiple choice draws nothing at random.
            results = simple_evaluate(model=lm, tasks=objects, task_manager=manager, limit=limit,
                                      log_samples=False, random_seed=None, numpy_random_seed=None,
                                      torch_random_seed=None)
        finally:
            model.to("cpu")
    accuracy = {}
    for name, values in results["results"].items():
        accuracy[name] = {_metric_name(key): float(value) for key, value in values.items()
                          if isinstance(value, (int, float)) and not isinstance(value, bool)
                          and key != "sample_len"}
    return {"tasks": accuracy, "task_items": items}


def task_accuracy(model: nn.Module, tokenizer, tasks: list[str], include_path: Path | str | None = None,
                  device: torch.device | str = "cpu", batch_size: int = 8,
                  limit: int | None = None) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` (lm-eval's metric names, see the module doc)."""
    return evaluate_tasks(model, tokenizer, tasks, include_path, device, batch_size, limit)["tasks"]
