"""copal's builtin lm-evaluation-harness tasks: zero-shot multiple choice built
from the *evaluation* parts of the builtin domains.

The task YAMLs sit beside this file (this folder is what `copal.lm_eval_tasks` hands
lm-eval's TaskManager as an include path; it is not called `tasks` because the
project's Prefect tasks already are). Their items are generated here, on
demand, deterministically: from the evaluation part of a builtin domain (so
they are offline, disjoint from every calibration set and from the reference
model's training data), with a fixed seed and item count that the YAML's
`metadata` passes in. Each generation also writes the items as JSONL into
`<data dir>/lm_tasks/<task>.jsonl` (the Arrow cache's folder: data/arrow or
$COPAL_DATA_DIR) for inspection; its SHA-256 is what `copal.lm_eval_tasks` reports as
`task_items`, so a result names the exact items.

* `copal_wordnet_define`: a WordNet gloss → the word it defines, among 4
  single words of the same part of speech.
* `copal_fortune_ending`: a fortune cookie without its last line → that line,
  among 4 (the other three are last lines of other fortunes).
"""

import hashlib
import json
import random
import re
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
BUILTIN_TASKS = ("copal_wordnet_define", "copal_fortune_ending")
CHOICES = 4


# ---------------------------------------------------------------- serialisation


def items_jsonl(items: list[dict]) -> bytes:
    """The canonical form of items: one JSON object per line, keys sorted, UTF-8.
    `copal.lm_eval_tasks` hashes evaluated documents the same way, so the SHA-256 of this
    file is the `task_items` SHA-256 a full evaluation reports."""
    return b"".join(json.dumps(item, sort_keys=True, ensure_ascii=False).encode() + b"\n" for item in items)


def items_sha256(items: list[dict]) -> str:
    return hashlib.sha256(items_jsonl(items)).hexdigest()


def _pick_distractors(rng: random.Random, pool: list[str], answer: str, avoid: set[str]) -> list[str]:
    """CHOICES - 1 distinct entries of `pool`, none equal to `answer` or in `avoid` (case-insensitive)."""
    taken = {answer.lower()} | {word.lower() for word in avoid}
    chosen: list[str] = []
    while len(chosen) < CHOICES - 1:
        candidate = pool[rng.randrange(len(pool))]
        if candidate.lower() not in taken:
            taken.add(candidate.lower())
            chosen.append(candidate)
    return chosen


def _shuffled(rng: random.Random, answer: str, distractors: list[str]) -> tuple[list[str], int]:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(answer)


# ---------------------------------------------------------------- WordNet definitions

# A sense line: "    n 1: gloss", "    adj 2: gloss", "    3: gloss" or "    v : gloss".
_SENSE = re.compile(r"^\s+(?:(n|v|adj|adv)\s+)?(\d+)?:\s*(.*)$")
_ANNOTATION = re.compile(r"\[(?:syn|ant|also|see)\s*:[^\]]*\]?", re.S)
_BRACED = re.compile(r"\{([^}]*)\}")
_WORD = re.compile(r"[a-z]{3,14}")


def parse_wordnet_entry(text: str) -> tuple[str, str, str, set[str]] | None:
    """(headword, part of speech, first gloss, synonyms) of a dictd WordNet entry,
    or None when it has no first sense. The gloss stops before the examples
    ("; \"...\"") and drops the [syn: …] / [ant: …] annotations."""
    lines = text.split("\n")
    headword = lines[0].strip()
    pos, sense = None, []
    for line in lines[1:]:
        match = _SENSE.match(line)
        if match and (match.group(1) or match.group(2)):
            if sense:
                break  # the second sense starts
            pos = match.group(1)
            sense.append(match.group(3))
        elif sense:
            sense.append(line.strip())
    if not sense or pos is None:
        return None
    joined = " ".join(part for part in sense if part)
    synonyms = {word.strip() for annotation in _ANNOTATION.findall(joined) for word in _BRACED.findall(annotation)}
    gloss = _ANNOTATION.sub("", joined)
    gloss = re.split(r';\s*"', gloss, maxsplit=1)[0]
    gloss = " ".join(gloss.split()).strip(" ;")
    return headword, pos, gloss, synonyms


def wordnet_define_items(texts: list[str], n: int, seed: int) -> list[dict]:
    """`n` items: a gloss and 4 candidate words, one of them the word it defines.

    Only lowercase single words of 3-14 letters whose gloss (20-150 characters)
    does not contain the word's first five letters; distractors are other such
    words of the same part of speech, never a synonym the entry lists."""
    eligible = []
    for text in texts:
        parsed = parse_wordnet_entry(text)
        if parsed is None:
            continue
        word, pos, gloss, synonyms = parsed
        if not _WORD.fullmatch(word) or not 20 <= len(gloss) <= 150 or word[:5] in gloss.lower():
            continue
        eligible.append((word, pos, gloss, synonyms))
    by_pos: dict[str, list[str]] = {}
    for word, pos, _, _ in eligible:
        by_pos.setdefault(pos, []).append(word)
    eligible = [entry for entry in eligible if len(by_pos[entry[1]]) > CHOICES * 4]
    if len(eligible) < n:
        raise ValueError(f"copal_wordnet_define: only {len(eligible)} eligible entries, {n} wanted")
    rng = random.Random(seed)
    items = []
    for word, pos, gloss, synonyms in rng.sample(eligible, n):
        choices, label = _shuffled(rng, word, _pick_distractors(rng, by_pos[pos], word, synonyms))
        items.append({"definition": gloss, "pos": pos, "choices": choices, "label": label})
    return items


# ---------------------------------------------------------------- fortune endings

# An attribution ("\t\t-- Mark Twain") is not an ending to guess.
_ATTRIBUTION = re.compile(r"^\s*(--|—)")


def fortune_ending_items(texts: list[str], n: int, seed: int) -> list[dict]:
    """`n` items: a fortune without its last line, and 4 candidate last lines.

    An attribution ("-- Mark Twain") and what follows it is cut off first. Then
    only fortunes of 2-10 lines, none longer than 80 characters, whose last line
    has 12-80 characters and at least three words; the distractors are last
    lines of other such fortunes."""
    eligible = []
    seen_endings = set()
    for text in texts:
        lines = [line.rstrip() for line in text.expandtabs(8).split("\n")]
        cut = next((index for index, line in enumerate(lines) if _ATTRIBUTION.match(line)), len(lines))
        lines = lines[:cut]
        while lines and not lines[-1].strip():
            lines.pop()
        if not 2 <= len(lines) <= 10 or any(len(line) > 80 for line in lines):
            continue
        context, ending = "\n".join(lines[:-1]).strip("\n"), lines[-1].strip()
        if len(context) < 20 or not 12 <= len(ending) <= 80 or len(ending.split()) < 3:
            continue
        if ending.lower() in seen_endings:
            continue  # a repeated punchline would be its own distractor
        seen_endings.add(ending.lower())
        eligible.append((context, ending))
    if len(eligible) < n:
        raise ValueError(f"copal_fortune_ending: only {len(eligible)} eligible fortunes, {n} wanted")
    pool = [ending for _, ending in eligible]
    rng = random.Random(seed)
    items = []
    for context, ending in rng.sample(eligible, n):
        choices, label = _shuffled(rng, ending, _pick_distractors(rng, pool, ending, set()))
        items.append({"context": context, "choices": choices, "label": label})
    return items


# ---------------------------------------------------------------- the builtin tasks

_GENERATORS = {"copal_wordnet_define": ("builtin:lexicon", wordnet_define_items),
               "copal_fortune_ending": ("builtin:fortunes", fortune_ending_items)}


def builtin_items(task: str, items: int, seed: int, data_dir: Path | None = None) -> list[dict]:
    """The items of builtin task `task`, from its domain's evaluation part."""
    from copal.data import ingest

    spec, generate = _GENERATORS[task]
    return generate(ingest(spec, data_dir).texts("evaluation"), items, seed)


def task_data_path(task: str, data_dir: Path | None = None) -> Path:
    from copal.data import arrow_dir

    return arrow_dir(data_dir) / "lm_tasks" / f"{task}.jsonl"


def write_items(task: str, items: list[dict], data_dir: Path | None = None) -> Path:
    """Write the items as canonical JSONL (atomically; unchanged files are left alone)."""
    path = task_data_path(task, data_dir)
    content = items_jsonl(items)
    if not (path.is_file() and path.read_bytes() == content):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_bytes(content)
        partial.replace(path)
    return path


def _dataset(task: str, items: int, seed: int):
    import datasets

    generated = builtin_items(task, int(items), int(seed))
    write_items(task, generated)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(generated)})


# The YAMLs' `custom_dataset`: lm-eval calls them with the YAML's metadata as keywords.
def load_wordnet_define(items: int = 400, seed: int = 0, **_):
    return _dataset("copal_wordnet_define", items, seed)


def load_fortune_ending(items: int = 400, seed: int = 0, **_):
    return _dataset("copal_fortune_ending", items, seed)
