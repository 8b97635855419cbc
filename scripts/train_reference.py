"""Train the shipped reference model from scratch: a byte-level BPE tokenizer and a
small LlamaForCausalLM on the *train* parts of the five builtin domains.

    python scripts/train_reference.py [--minutes 45] [--out data/models/reference] [--device auto]

The whole run (tokenizer, data, training, save) keeps to `--minutes` of wall time.
The cosine schedule runs on the wall clock: training uses all the time left and the
learning rate reaches its floor at the deadline, however the speed of a shared
machine varies on the way (a step-count plan made from a throughput measured at
the start either stops early or is cut off mid-schedule when it does). The measured
throughput sizes the training data instead.
Writes the model, tokenizer, training_log.jsonl and TRAINING.md into `--out`.
"""

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

# OpenMP threads that spin while they wait make training several times slower when
# other processes share the cores; waiting passively avoids that (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from copal.data import ingest
from copal.windows import token_stream
from copal.model import resolve_device

DOMAINS = ("builtin:docs", "builtin:lexicon", "builtin:code", "builtin:fortunes", "builtin:manuals")
EOT = "<|endoftext|>"
SAVE_MARGIN_S = 30  # kept free at the end of the budget for saving and the report
MAX_WEIGHTS_MB = 30


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=45, help="wall-time budget of the whole run")
    parser.add_argument("--out", type=Path, default=Path("data/models/reference"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokenizer-mb", type=float, default=3, help="text per domain the tokenizer learns from")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    parser.add_argument("--warmup", type=int, default=100,
                        help="linear warmup steps (at most a tenth of the steps expected to fit)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="bf16 autocast; auto = on for CUDA only (on CPUs without AMX/AVX-512 it is far slower)")
    parser.add_argument("--log-every", type=int, default=25)
    return parser.parse_args(argv)


def train_tokenizer(train_texts: dict[str, list[str]], vocab_size: int, chars_per_domain: int):
    """Byte-level BPE on an equal-sized sample of every domain (the first documents
    in hash order, i.e. a seeded random sample)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def sample():
        for texts in train_texts.values():
            total = 0
            for text in texts:
                yield text
                total += len(text)
                if total >= chars_per_domain:
                    break

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sample(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT)


def training_sequences(train_texts: dict[str, list[str]], tokenizer, tokens_per_domain: int, seqlen: int,
                       seed: int) -> tuple[torch.Tensor, dict[str, dict]]:
    """Every domain contributes the same number of `seqlen` sequences (a domain with
    fewer tokens is repeated), cut from its documents joined with "\\n\\n" exactly as
    the evaluation protocol joins them; the sequences are shuffled together."""
    per_domain = max(1, tokens_per_domain // seqlen)
    chunks, stats = [], {}
    for name, texts in train_texts.items():
        stream = token_stream(texts, tokenizer, per_domain * seqlen)
        available = len(stream) // seqlen
        sequences = stream[: available * seqlen].view(available, seqlen)
        repeats = math.ceil(per_domain / available)
        chunks.append(sequences.repeat(repeats, 1)[:per_domain])
        stats[name] = {"documents": len(texts), "distinct_tokens": available * seqlen,
                       "tokens": per_domain * seqlen, "epochs": round(per_domain / available, 2)}
    data = torch.cat(chunks)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data[order], stats


def build_model(args, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.seqlen,
                         tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot, use_cache=False)
    # Every linear input (hidden, intermediate) must split into groups of 8 for N:M sparsity.
    assert args.hidden % 8 == 0 and args.intermediate % 8 == 0, "hidden and intermediate must be multiples of 8"
    return LlamaForCausalLM(config)


def cosine_lr(progress: float, args) -> float:
    """From --lr at progress 0 down to --lr × --min-lr-ratio at progress 1."""
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_step(model, optimizer, args, device, autocast: bool):
    def step(batch: torch.Tensor, lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batch.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def make_optimizer(model, args):
    """AdamW; no weight decay on norms (1-d tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def measure_throughput(args, tokenizer, device, autocast: bool, seconds: float = 20) -> float:
    """Training tokens/s of a throwaway copy of the model on random tokens."""
    model = build_model(args, tokenizer).to(device).train()
    step = make_step(model, make_optimizer(model, args), args, device, autocast)
    batch = torch.randint(0, len(tokenizer), (args.batch, args.seqlen))
    step(batch, 0.0)  # warm-up: allocations, kernel selection
    start, steps = time.time(), 0
    while time.time() - start < seconds or steps < 3:
        step(batch, 0.0)
        steps += 1  # each step ends in loss.item(), which waits for the device
    return steps * args.batch * args.seqlen / (time.time() - start)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.time()
    deadline = started + args.minutes * 60 - SAVE_MARGIN_S
    device = resolve_device(args.device)
    autocast = args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cuda")
    args.out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {message}", flush=True)

    log(f"device {device}, {torch.get_num_threads()} CPU threads, bf16 autocast {autocast}")
    train_texts = {}
    for spec in DOMAINS:
        domain = ingest(spec)
        train_texts[domain.name] = domain.texts("train")
        log(f"{spec}: {len(train_texts[domain.name])} train documents, "
            f"{sum(map(len, train_texts[domain.name])) / 1e6:.1f} M chars")

    tokenizer = train_tokenizer(train_texts, args.vocab, int(args.tokenizer_mb * 1e6))
    log(f"tokenizer: {len(tokenizer)} tokens")

    rate = measure_throughput(args, tokenizer, device, autocast)
    # Tokenise enough text for the steps expected to fit, with headroom for a machine that speeds up.
    tokens_per_domain = int(1.5 * rate * max(deadline - time.time(), 60) / len(DOMAINS))
    log(f"throughput {rate:.0f} tokens/s; tokenising {tokens_per_domain / 1e6:.2f} M tokens per domain")
    data, data_stats = training_sequences(train_texts, tokenizer, tokens_per_domain, args.seqlen, args.seed)
    del train_texts
    for name, stats in data_stats.items():
        log(f"  {name}: {stats}")

    torch.manual_seed(args.seed)  # the same initial weights on every run
    model = build_model(args, tokenizer).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, args)
    step_fn = make_step(model, optimizer, args, device, autocast)
    train_start = time.time()
    budget = deadline - train_start
    expected = int(rate * budget / (args.batch * args.seqlen))
    log(f"model: {n_params / 1e6:.2f} M parameters ({n_params * 4 / 1e6:.1f} MB fp32); "
        f"about {expected} steps ({expected * args.batch * args.seqlen / 1e6:.1f} M tokens) fit in {budget:.0f} s")
    warmup = min(args.warmup, max(1, expected // 10))

    log_path = args.out / "training_log.jsonl"
    log_file = log_path.open("w")
    step, seen, window, cursor, final_loss = 0, 0, [], 0, float("nan")

    def record(lr: float) -> float:
        entry = {"step": step, "tokens": seen, "loss": round(sum(window) / len(window), 4),
                 "lr": round(lr, 7), "elapsed_s": round(time.time() - started, 1)}
        log_file.write(json.dumps(entry) + "\n")
        log_file.flush()
        log(f"step {step} tokens {seen / 1e6:.2f}M loss {entry['loss']:.4f} lr {lr:.2e}")
        window.clear()
        return entry["loss"]

    decay_start = None  # when warmup ended; the cosine spans from there to the deadline
    while time.time() < deadline:
        if step < warmup:
            lr = args.lr * (step + 1) / warmup
        else:
            decay_start = decay_start or time.time()
            lr = cosine_lr((time.time() - decay_start) / (deadline - decay_start), args)
        if cursor + args.batch > len(data):  # another pass over the (reshuffled) data
            data = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed + step))]
            cursor = 0
        window.append(step_fn(data[cursor : cursor + args.batch], lr))
        cursor += args.batch
        step += 1
        seen += args.batch * args.seqlen
        if step % args.log_every == 0:
            final_loss = record(lr)
    if window:
        final_loss = record(lr)
    log_file.close()
    train_seconds = time.time() - train_start

    model.eval()
    model.to("cpu").save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    weights_mb = sum(f.stat().st_size for f in args.out.glob("*.safetensors")) / 1e6
    total_mb = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file()) / 1e6
    if weights_mb > MAX_WEIGHTS_MB:
        log(f"warning: weights are {weights_mb:.1f} MB, above the {MAX_WEIGHTS_MB} MB of the shipped model")
    wall = time.time() - started
    log(f"done: {step} steps, {seen / 1e6:.2f} M tokens, final loss {final_loss:.4f}, "
        f"weights {weights_mb:.1f} MB, wall {wall / 60:.1f} min")

    config = model.config
    command = shlex.join(["python", "scripts/train_reference.py", *(sys.argv[1:] if argv is None else argv)])
    data_rows = "\n".join(f"| {name} | {s['documents']} | {s['distinct_tokens']:,} | {s['tokens']:,} | {s['epochs']} |"
                          for name, s in data_stats.items())
    (args.out / "TRAINING.md").write_text(f"""# Reference model

Trained from scratch by `scripts/train_reference.py` on the *train* parts of the
five builtin domains (never on calibration or evaluation documents).

    {command}

## Tokenizer

Byte-level BPE (`tokenizers`), {len(tokenizer)} tokens, learned from the first
{args.tokenizer_mb:g} MB (or all) of each domain's train part. `{EOT}` (id {config.eos_token_id}) is
bos/eos; documents are joined with "\\n\\n", as in the evaluation protocol.

## Model

`LlamaForCausalLM`, {n_params:,} parameters ({n_params * 4 / 1e6:.1f} MB as float32), stored as float32 safetensors
({weights_mb:.1f} MB; {total_mb:.1f} MB the whole directory):
hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads
(head dim {config.hidden_size // config.num_attention_heads}), MLP {config.intermediate_size} (SwiGLU),
RoPE, RMSNorm, tied input/output embeddings, context {config.max_position_embeddings}.

## Training

- data: {args.seqlen}-token sequences; every domain contributes the same number of tokens
  (a smaller domain is repeated), all shuffled together:

| domain | train documents | distinct tokens | tokens in the mix | epochs |
|---|---|---|---|---|
{data_rows}

- AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak lr {args.lr:g}, {warmup}
  warmup steps, cosine decay to {args.lr * args.min_lr_ratio:g}, gradient clipping at {args.clip:g},
  batch {args.batch} × {args.seqlen} tokens, seed {args.seed}, {"bf16 autocast" if autocast else "float32"}
  on {device} ({torch.get_num_threads()} CPU threads).
- throughput measured before training {rate:.0f} tokens/s (about {expected} steps expected); ran {step} steps
- tokens seen: {seen:,}
- training time {train_seconds / 60:.1f} min; whole run {wall / 60:.1f} min (wall clock)
- final training loss (mean of the last logged steps): {final_loss:.4f}
  — per step in `training_log.jsonl`
""")


if __name__ == "__main__":
    main()
