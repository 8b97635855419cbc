"""The tokenizer's convention for the start of a text: the special tokens it puts
before text by default (a BOS for Gemma, Llama-2, Mistral and many others; none
for GPT-2-style byte-level BPE tokenizers such as the reference model's and
SmolLM2's).

A model meets text in use after those tokens, so every window copal builds
(calibration, evaluation, replay) starts with them, and they are context, never
scored: a window of `seqlen` tokens holds the prefix and `seqlen - len(prefix)`
text tokens, and perplexity predicts exactly the text tokens (lm-eval's rolling
convention). A tokenizer that adds nothing gives windows of text only, as before.
"""

from dataclasses import dataclass

from copal.records import Tokenization

# Probe texts: the convention is what calling the tokenizer adds around them.
_PROBES = ("Hello world", "x = 1\n\nThe end.")


@dataclass(frozen=True)
class TextStart:
    """The token ids (and their strings) a window starts with before its text."""

    ids: tuple[int, ...] = ()
    tokens: tuple[str, ...] = ()

    def record(self) -> Tokenization:
        """What a step records as `tokenization` (empty lists: no prefix)."""
        return Tokenization(prefix_ids=list(self.ids), prefix=list(self.tokens))

    @classmethod
    def from_record(cls, record: Tokenization | None) -> "TextStart":
        """A recorded convention; a step recorded before copal kept one had none."""
        record = record or Tokenization()
        return cls(tuple(record.prefix_ids), tuple(record.prefix))


def _prefix(tokenizer, text: str) -> list[int] | None:
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    default = tokenizer(text)["input_ids"]
    for start in range(len(default) - len(plain) + 1):
        if default[start : start + len(plain)] == plain:
            return default[:start]
    return None


def text_start(tokenizer) -> TextStart:
    """The special tokens `tokenizer` puts before a text by default (its BOS, if it adds one).

    Only special tokens count (a tokenizer's own text normalisation is the same with
    and without special tokens), and only what it adds to every probe alike."""
    prefixes = {tuple(_prefix(tokenizer, probe) or ()) for probe in _PROBES}
    if len(prefixes) != 1:
        return TextStart()
    ids = prefixes.pop()
    if not ids or not set(ids) <= set(tokenizer.all_special_ids):
        return TextStart()
    return TextStart(ids, tuple(tokenizer.convert_ids_to_tokens(list(ids))))
