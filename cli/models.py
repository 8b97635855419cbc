"""Commands on models and data outside a run: evaluate a model, ingest data
sources, import a GGUF file."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import command
from cli.console import err
from cli.logs import setup_logging
from copal.errors import InputError


@command
def eval(  # noqa: A001 - the command is called eval
    model: Annotated[Path, typer.Option(metavar="MODEL_DIR", help="A Hugging Face model directory (or hub id).")],
    data: Annotated[Optional[str], typer.Option(
        metavar="DATA", help="Data source for perplexity, e.g. builtin:docs, text:PATH, "
                             "jsonl:PATH[:FIELD].")] = None,
    tasks: Annotated[Optional[str], typer.Option(
        metavar="NAME[,NAME…]", help="lm-eval tasks for accuracy, NAME[,NAME…]: copal's "
                                     "(copal_wordnet_define, copal_fortune_ending), the include "
                                     "path's, or lm-eval's own (online).")] = None,
    include_path: Annotated[Optional[Path], typer.Option(metavar="DIR", help="A folder of lm-eval task YAMLs.")] = None,
    task_limit: Annotated[Optional[int], typer.Option(
        metavar="N", help="At most this many items per task (the first).")] = None,
    seqlen: Annotated[int, typer.Option(metavar="N", help="Tokens per evaluation window.")] = 256,
    max_tokens: Annotated[int, typer.Option(metavar="N", help="Evaluate on at most this many tokens.")] = 65536,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N.")] = "auto",
):
    """Perplexity on a data source's evaluation part and/or accuracy on lm-eval tasks; prints one JSON object.

    --data: {"ppl", "tokens"}; --tasks: {"tasks": {NAME: {METRIC: value}}, "task_items": {NAME: {"items",
    "sha256"}}}; both: both in one object."""
    from copal.data import ingest
    from copal.metrics import perplexity
    from copal.model import load_model, resolve_device
    from copal.windows import evaluation_windows

    setup_logging(False)
    if include_path is not None and tasks is None:
        raise InputError(f"--include-path {include_path}: only used with --tasks")
    if data is None and tasks is None:
        raise InputError("give --data (perplexity), --tasks (task accuracy) or both")
    if task_limit is not None and task_limit < 1:
        raise InputError(f"--task-limit {task_limit}: must be at least 1")
    if data is not None:
        if seqlen < 2 or max_tokens < seqlen:
            raise InputError(f"--seqlen {seqlen} / --max-tokens {max_tokens}: need 2 <= seqlen <= max-tokens")
        domain = ingest(data)
    names = None
    if tasks is not None:
        from copal.lm_eval_tasks import check_tasks, evaluate_tasks, parse_task_list

        names = parse_task_list(tasks)
        check_tasks(names, include_path)
    loaded, tokenizer = load_model(str(model))
    result = {}
    if data is not None:
        ppl, tokens = perplexity(loaded, evaluation_windows(domain, tokenizer, seqlen, max_tokens),
                                 resolve_device(device))
        result |= {"ppl": ppl, "tokens": tokens}
    if names is not None:
        result |= evaluate_tasks(loaded, tokenizer, names, include_path, resolve_device(device), limit=task_limit)
    print(json.dumps(result))


@command
def ingest(
    data: Annotated[list[str], typer.Argument(
        metavar="DATA", help="Data sources, e.g. builtin:docs text:PATH jsonl:PATH[:FIELD].")],
    data_dir: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Arrow cache folder. Default: data/arrow "
                                                          "(or $COPAL_DATA_DIR).")] = None,
):
    """Ingest data sources into Arrow (train/calibration/evaluation splits); prints JSON per source."""
    from copal.data import ingest as ingest_source

    setup_logging(False)
    for spec in data:
        domain = ingest_source(spec, data_dir)
        print(json.dumps({"name": domain.name, "source": spec, "fingerprint": domain.fingerprint,
                          "path": str(domain.path), "documents": domain.counts}))


@command
def import_gguf(
    gguf: Annotated[Path, typer.Argument(metavar="GGUF", help="A GGUF file of a causal LM that transformers "
                                                               "can read (any quantisation).")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Output model directory (must not exist "
                                                                    "or be empty).")],
    dtype: Annotated[str, typer.Option(
        metavar="DTYPE", help="float32 or bfloat16: what the weights are un-quantised to.")] = "float32",
):
    """A GGUF model as a plain Hugging Face directory (float safetensors, tokenizer, chat template).

    Also writes gguf_source.json: the GGUF's file name and SHA-256."""
    from copal.gguf import import_gguf as convert

    setup_logging(False)
    done = convert(gguf, out_dir, dtype)
    err.print(f"wrote {out_dir}: {'/'.join(done['architectures'] or [done['architecture']])}, "
              f"{done['parameters'] / 1e6:.1f} M parameters in {done['dtype']}, "
              f"{done['bytes_written'] / 1e6:.0f} MB, from {done['file']} (sha256 {done['sha256'][:12]}…) "
              f"in {done['seconds']:.0f} s", markup=False, highlight=False, soft_wrap=True)

