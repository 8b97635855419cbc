"""Where does one benchmark cell lose to another? Per domain and per layer.

Reads finished cells of a `copal bench` grid (OUT/cells/<id>) and reports:

* per domain: each cell's final PPL and its forgetting (final PPL minus the PPL
  right after the step that calibrated on the domain), from metrics.json;
* per layer: the relative output error of the cell's final weights on each
  domain's held-out text, e = ‖X(W0 − W)ᵀ‖² / ‖X W0ᵀ‖², with X the dense
  model's inputs to that layer (the layer-wise pass's own error proxy,
  computed through the Hessian: e = tr(ΔW H ΔWᵀ) / tr(W0 H W0ᵀ)), grouped by
  layer kind (q, k, v, o, gate, up, down) and depth third;
* per layer kind: how far the cells' final masks agree.

    python benchmarks/diagnose_cells.py --grid reports/smollm2 \\
        --cells copal-accumulate-u50,wanda-accumulate-u50,sparsegpt-accumulate-u50 \\
        [--tokens 2048] [--out reports/smollm2/diagnosis.json]
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from copal.calibrate import BlockStatistics
from copal.data import ingest
from copal.windows import evaluation_windows
from copal.export import load_step_model
from copal.methods import Hessian
from copal.model import all_prunable, load_model, weight_matrix
from copal.records import RunMetrics
from copal.rundir import RunDir


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1].removesuffix("_proj")


def _depth(name: str, blocks: int) -> str:
    index = int(next(part for part in name.split(".") if part.isdigit()))
    return ("early", "middle", "late")[min(2, 3 * index // blocks)]


def domain_table(cells: dict[str, RunMetrics]) -> dict:
    """{domain: {cell: {"final": ppl, "forgetting": ppl change since its own step}}}."""
    table = defaultdict(dict)
    for cell_id, metrics in cells.items():
        order = [step.domain for step in metrics.steps]
        final = metrics.ppl[-1]
        for column, domain in enumerate(metrics.domains):
            at_step = metrics.ppl[order.index(domain)][column] if domain in order else None
            table[domain][cell_id] = {"final": final[column],
                                      "forgetting": None if at_step is None else final[column] - at_step}
    return dict(table)


def layer_errors(model_dir: str, weights: dict[str, dict[str, torch.Tensor]], domains: list[str],
                 tokens: int, seqlen: int) -> dict:
    """{domain: {cell: {layer: relative output error}}} on each domain's first `tokens` held-out tokens."""
    model, tokenizer = load_model(model_dir)
    modules = all_prunable(model)
    dense = {name: weight_matrix(module).detach() for name, module in modules.items()}
    errors = {}
    for spec in domains:
        domain = ingest(spec)
        windows = evaluation_windows(domain, tokenizer, seqlen, tokens)
        hessians = BlockStatistics(modules, Hessian, torch.device("cpu"))
        with torch.no_grad():
            for batch in windows.split(4):
                model(input_ids=batch, use_cache=False)
        hessians.close()
        values = hessians.values()
        per_cell = {}
        for cell_id, final in weights.items():
            per_layer = {}
            for name, w0 in dense.items():
                h = values[name]
                delta = w0 - final[name]
                per_layer[name] = float(((delta @ h) * delta).sum() / ((w0 @ h) * w0).sum())
            per_cell[cell_id] = per_layer
        errors[domain.name] = per_cell
        del hessians, values
    return errors


def summarize(errors: dict, blocks: int) -> dict:
    """Mean relative error per (cell, layer kind) and per (cell, depth third), over domains."""
    by_kind, by_depth = defaultdict(list), defaultdict(list)
    for per_cell in errors.values():
        for cell_id, per_layer in per_cell.items():
            for name, value in per_layer.items():
                by_kind[(cell_id, _kind(name))].append(value)
                by_depth[(cell_id, _depth(name, blocks))].append(value)
    return {"kind": {f"{cell}|{kind}": statistics.fmean(v) for (cell, kind), v in sorted(by_kind.items())},
            "depth": {f"{cell}|{depth}": statistics.fmean(v) for (cell, depth), v in sorted(by_depth.items())},
            "domain": {f"{cell}|{domain}": statistics.fmean(per_layer.values())
                       for domain, per_cell in errors.items() for cell, per_layer in per_cell.items()}}


def mask_agreement(masks: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Per layer kind, the share of weights on which each pair of cells' masks agree."""
    cells = list(masks)
    agreement = {}
    for i, a in enumerate(cells):
        for b in cells[i + 1:]:
            same, total = defaultdict(int), defaultdict(int)
            for name, mask in masks[a].items():
                same[_kind(name)] += int((mask == masks[b][name]).sum())
                total[_kind(name)] += mask.numel()
            agreement[f"{a}|{b}"] = {kind: same[kind] / total[kind] for kind in total}
    return agreement


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, required=True)
    parser.add_argument("--cells", required=True, help="comma-separated cell ids")
    parser.add_argument("--tokens", type=int, default=2048, help="held-out tokens per domain for the layer errors")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cell_ids = args.cells.split(",")
    metrics, weights, masks, config = {}, {}, {}, None
    for cell_id in cell_ids:
        root = args.grid / "cells" / cell_id
        run = RunDir(root).require()
        config, _ = run.read_config()
        metrics[cell_id] = RunMetrics.model_validate(json.loads(run.metrics_path.read_text()))
        model, _ = load_step_model(root, run.head())
        weights[cell_id] = {name: weight_matrix(module).detach() for name, module in all_prunable(model).items()}
        state = run.step(run.head())
        masks[cell_id] = {name: state.mask(name) for name in state.mask_names()}
        del model
    blocks = 1 + max(int(next(p for p in name.split(".") if p.isdigit())) for name in masks[cell_ids[0]])
    errors = layer_errors(config.model, weights, config.domains, args.tokens, args.seqlen)
    result = {"grid": str(args.grid), "cells": cell_ids, "tokens_per_domain": args.tokens,
              "domains": domain_table(metrics), "layer_error": summarize(errors, blocks),
              "mask_agreement": mask_agreement(masks), "layer_error_per_layer": errors}
    out = args.out or args.grid / "diagnosis.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({key: result[key] for key in ("domains", "layer_error", "mask_agreement")}, indent=1))
    return result


if __name__ == "__main__":
    main()
