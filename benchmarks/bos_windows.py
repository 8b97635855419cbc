"""copal's perplexity on a model whose tokenizer adds a BOS, against an independent loop.

No BOS-adding LLM reaches this offline machine, so the model is SmolLM2-135M with
a variant of its tokenizer that starts every text with `<|endoftext|>` (its
document separator) by a template post-processor, as Llama-2's and Gemma's
tokenizers start theirs with BOS. Measured on one builtin domain's evaluation part:

* copal: `copal.windows.evaluation_windows` + `copal.metrics.perplexity` (what
  `copal eval`, a run's evaluation and a replay use): every window the BOS and
  seqlen - 1 text tokens, the text tokens scored;
* independent: plain transformers, written from the convention alone (tokenise
  the joined text without special tokens, chunks of seqlen - 1 tokens each after
  the BOS, log-softmax in float64, BOS never scored);
* the same model without BOS (text-only windows) for scale.

    python benchmarks/bos_windows.py [--data builtin:docs] [--seqlen 128] [--max-tokens 4096]
    → reports/bos_windows.json
"""

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def bos_variant(model_dir: Path, folder: Path) -> Path:
    """`model_dir` with its tokenizer made to start every text with <|endoftext|>."""
    from tokenizers import Tokenizer, processors

    for file in model_dir.iterdir():
        target = folder / file.name
        if file.name == "tokenizer.json":
            continue
        if file.suffix == ".safetensors":
            target.symlink_to(file.resolve())
        elif file.is_file():
            shutil.copy(file, target)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos = "<|endoftext|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["bos_token"] = bos
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def independent(model, tokenizer, texts: list[str], seqlen: int, max_tokens: int, bos: int | None):
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"][:max_tokens]
    step = seqlen - 1 if bos is not None else seqlen
    nll, scored = [], 0
    with torch.no_grad():
        for start in range(0, len(ids) - step + 1, step):
            window = torch.tensor(([bos] if bos is not None else []) + ids[start : start + step])
            logprobs = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
            targets = window[1:]
            nll.append(-logprobs[torch.arange(len(targets)), targets].sum().item())
            scored += len(targets)
    return math.exp(math.fsum(nll) / scored), scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "data/models/smollm2-135m"))
    parser.add_argument("--data", default="builtin:docs")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--out", default=str(ROOT / "reports/bos_windows.json"))
    args = parser.parse_args()

    from copal import splits
    from copal.data import ingest
    from copal.windows import evaluation_windows
    from copal.metrics import perplexity
    from copal.model import load_model
    from copal.tokens import text_start

    domain = ingest(args.data)
    texts = domain.texts(splits.EVALUATION)
    results = {"model": args.model, "data": args.data, "seqlen": args.seqlen, "max_tokens": args.max_tokens,
               "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as scratch:
        for label, folder in (("plain", Path(args.model)), ("bos", bos_variant(Path(args.model), Path(scratch)))):
            model, tokenizer = load_model(str(folder))
            start = text_start(tokenizer)
            began = time.perf_counter()
            ppl, tokens = perplexity(model, evaluation_windows(domain, tokenizer, args.seqlen, args.max_tokens),
                                     torch.device("cpu"))
            copal_s = time.perf_counter() - began
            expected, scored = independent(model, tokenizer, texts, args.seqlen, args.max_tokens,
                                           start.ids[0] if start.ids else None)
            results[label] = {"start_tokens": list(start.tokens), "copal_ppl": ppl, "copal_tokens": tokens,
                              "independent_ppl": expected, "independent_tokens": scored,
                              "relative_difference": abs(ppl - expected) / expected, "copal_seconds": copal_s}
            print(label, json.dumps(results[label]))
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
