"""Token windows from an ingested domain (copal.data): seeded calibration samples
from its calibration part, non-overlapping evaluation windows from its evaluation
part, each led by the tokenizer's start tokens (copal.tokens)."""

import torch

from copal import splits
from copal.data import Domain
from copal.errors import InputError
from copal.tokens import TextStart, text_start


def token_stream(texts: list[str], tokenizer, min_tokens: int) -> torch.Tensor:
    """Tokens of `"\\n\\n".join(texts)`, or of a prefix of the documents long enough
    to give at least `min_tokens` tokens (tokenising megabytes we then drop is waste)."""
    chars = max(4 * min_tokens, 4096)
    while True:
        prefix, total = [], 0
        for text in texts:
            prefix.append(text)
            total += len(text) + 2
            if total >= chars:
                break
        ids = tokenizer("\n\n".join(prefix), add_special_tokens=False)["input_ids"]
        if len(ids) >= min_tokens or len(prefix) == len(texts):
            return torch.tensor(ids, dtype=torch.long)
        chars *= 2


def _with_start(windows: torch.Tensor, start: TextStart) -> torch.Tensor:
    """`windows` (count, text tokens) with the tokenizer's start tokens before each."""
    if not start.ids:
        return windows
    prefix = torch.tensor(start.ids, dtype=windows.dtype).expand(len(windows), len(start.ids))
    return torch.cat([prefix, windows], dim=1)


def _text_length(domain: Domain, seqlen: int, start: TextStart) -> int:
    length = seqlen - len(start.ids)
    if length < 2:
        raise InputError(f"{domain.source.spec}: seqlen={seqlen} leaves {length} text token(s) after the "
                         f"tokenizer's start tokens {list(start.tokens)}; need at least 2")
    return length


def calibration_samples(domain: Domain, tokenizer, nsamples: int, seqlen: int, seed: int,
                        start: TextStart | None = None) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets of the
    calibration part → LongTensor (nsamples, seqlen). Each starts with the
    tokenizer's start tokens (`start`, default: `copal.tokens.text_start`), if any,
    followed by text."""
    start = text_start(tokenizer) if start is None else start
    length = _text_length(domain, seqlen, start)
    stream = token_stream(domain.texts(splits.CALIBRATION), tokenizer, 8 * nsamples * length)
    if len(stream) <= length:
        raise InputError(f"{domain.source.spec}: calibration part has {len(stream)} tokens; "
                         f"need more than seqlen={seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length + 1, (nsamples,), generator=generator)
    return _with_start(torch.stack([stream[s : s + length] for s in starts.tolist()]), start)


def evaluation_windows(domain: Domain, tokenizer, seqlen: int, max_tokens: int,
                       start: TextStart | None = None) -> torch.Tensor:
    """Non-overlapping windows over the evaluation part (at most `max_tokens` text
    tokens, remainder dropped) → LongTensor (nwindows, seqlen): each the tokenizer's
    start tokens (`start`, default: `copal.tokens.text_start`), if any, then the
    next `seqlen - len(start)` text tokens, so exactly the text tokens are predicted."""
    start = text_start(tokenizer) if start is None else start
    length = _text_length(domain, seqlen, start)
    stream = token_stream(domain.texts(splits.EVALUATION), tokenizer, max_tokens)[:max_tokens]
    nwindows = len(stream) // length
    if nwindows == 0:
        raise InputError(f"{domain.source.spec}: evaluation part has {len(stream)} tokens; "
                         f"need at least seqlen={seqlen}")
    return _with_start(stream[: nwindows * length].view(nwindows, length), start)
