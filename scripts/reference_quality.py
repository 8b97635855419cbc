"""Dense quality of the reference model: per builtin domain, the perplexity on the
evaluation part (the project's protocol: non-overlapping 256-token windows, at most
65,536 tokens) next to an add-one-smoothed unigram model of the same tokenizer whose
frequencies are counted on that domain's train part, scored on exactly the same
predicted tokens (2..256 of every window).

    python scripts/reference_quality.py [--model data/models/reference]

Writes MODEL/quality.json, prints a Markdown table and puts it into MODEL/TRAINING.md.
"""

import argparse
import json
import math
from pathlib import Path

import torch

from copal.data import ingest
from copal.windows import evaluation_windows
from copal.metrics import perplexity
from copal.model import load_model
from train_reference import DOMAINS  # this script's folder is on sys.path when run as a script

SEQLEN, MAX_TOKENS = 256, 65536


def unigram_perplexity(train_texts: list[str], windows: torch.Tensor, tokenizer) -> float:
    ids = tokenizer("\n\n".join(train_texts), add_special_tokens=False)["input_ids"]
    counts = torch.bincount(torch.tensor(ids), minlength=len(tokenizer)).double() + 1  # add-one smoothing
    log_probs = counts.log() - counts.sum().log()
    targets = windows[:, 1:]
    return math.exp(-log_probs[targets].mean().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("data/models/reference"))
    args = parser.parse_args()
    model, tokenizer = load_model(str(args.model))

    quality = {}
    for spec in DOMAINS:
        domain = ingest(spec)
        windows = evaluation_windows(domain, tokenizer, SEQLEN, MAX_TOKENS)
        ppl, tokens = perplexity(model, windows, torch.device("cpu"), batch_size=8)
        quality[domain.name] = {"ppl": round(ppl, 3),
                                "unigram_ppl": round(unigram_perplexity(domain.texts("train"), windows, tokenizer), 3),
                                "tokens": tokens}
        print(f"{domain.name}: {quality[domain.name]}", flush=True)
    (args.model / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")

    table = "\n".join(["| domain | model PPL | unigram PPL | ratio | predicted tokens |", "|---|---|---|---|---|",
                       *(f"| {name} | {q['ppl']:.2f} | {q['unigram_ppl']:.2f} | {q['unigram_ppl'] / q['ppl']:.1f}× "
                         f"| {q['tokens']:,} |" for name, q in quality.items())])
    print(table)
    section = ("## Quality\n\nDense perplexity on each domain's evaluation part (`scripts/reference_quality.py`), "
               "next to an add-one-smoothed unigram model of the domain's train part on the same tokens:\n\n"
               f"{table}\n")
    report = args.model / "TRAINING.md"
    if report.is_file():
        head = report.read_text().split("\n## Quality\n")[0].rstrip("\n")
        report.write_text(f"{head}\n\n{section}")


if __name__ == "__main__":
    main()
