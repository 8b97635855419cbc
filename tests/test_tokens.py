"""The tokenizer's start-of-text convention (copal.tokens): a tokenizer that adds a BOS
gets it at the start of every calibration and evaluation window, unscored, in runs,
replays and lm-eval; one that adds none gets text-only windows, as before."""

import math

import pytest
import torch

from conftest import read_json, small_config


def _tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_the_start_tokens_are_what_the_tokenizer_adds(bos_tokenizer_dir, tokenizer_dir):
    from copal.tokens import TextStart, text_start

    bos = _tokenizer(bos_tokenizer_dir)
    start = text_start(bos)
    assert start.ids == (bos.bos_token_id,) and start.tokens == ("<bos>",)
    assert TextStart.from_record(start.record()) == start
    assert text_start(_tokenizer(tokenizer_dir)) == TextStart()
    assert TextStart.from_record(None) == TextStart()  # a step recorded before the convention was


def test_every_window_starts_with_the_bos_then_consecutive_text(bos_tokenizer_dir, corpus_dir, data_dir):
    from copal import splits
    from copal.data import ingest
    from copal.windows import calibration_samples, evaluation_windows

    tokenizer = _tokenizer(bos_tokenizer_dir)
    bos = tokenizer.bos_token_id
    domain = ingest(f"text:{corpus_dir / 'alpha'}.txt")
    samples = calibration_samples(domain, tokenizer, 6, 32, seed=0)
    windows = evaluation_windows(domain, tokenizer, 32, 1000)
    for cut in (samples, windows):
        assert cut.shape[1] == 32 and (cut[:, 0] == bos).all() and not (cut[:, 1:] == bos).any()
    text = tokenizer("\n\n".join(domain.texts(splits.EVALUATION)), add_special_tokens=False)["input_ids"]
    assert windows.shape[0] == 1000 // 31
    assert windows[:, 1:].reshape(-1).tolist() == text[: windows.shape[0] * 31]


def _independent_ppl(model, tokenizer, texts: list[str], seqlen: int, max_tokens: int) -> tuple[float, int]:
    """A loop written from the convention alone: the text tokens, cut into chunks of
    seqlen - 1, each after a BOS; every text token scored, the BOS never (float64 sums)."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"][:max_tokens]
    nll, scored = [], 0
    with torch.no_grad():
        for start in range(0, len(ids) - (seqlen - 1) + 1, seqlen - 1):
            window = torch.tensor([tokenizer.bos_token_id] + ids[start : start + seqlen - 1])
            logprobs = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
            targets = window[1:]
            nll.append(-logprobs[torch.arange(len(targets)), targets].sum().item())
            scored += len(targets)
    return math.exp(math.fsum(nll) / scored), scored


def test_perplexity_of_a_bos_model_is_the_independent_loops(bos_llama_dir, corpus_dir, data_dir):
    from transformers import AutoModelForCausalLM

    from copal import splits
    from copal.data import ingest
    from copal.windows import evaluation_windows
    from copal.metrics import perplexity

    tokenizer = _tokenizer(bos_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(bos_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # sharp logits, so a misaligned target or a scored BOS shows
        model.get_output_embeddings().weight.mul_(20)
    domain = ingest(f"text:{corpus_dir / 'beta'}.txt")
    expected, scored = _independent_ppl(model, tokenizer, domain.texts(splits.EVALUATION), 64, 1000)
    ppl, tokens = perplexity(model, evaluation_windows(domain, tokenizer, 64, 1000), torch.device("cpu"), 4)
    assert tokens == scored == (1000 // 63) * 63
    assert abs(ppl - expected) / expected < 1e-6


def test_a_run_records_its_convention_and_environment_and_replays(tmp_path, data_dir, bos_llama_dir, llama_dir,
                                                                   corpus_dir):
    from copal.config import build_config
    from copal.continual import ContinualRun

    for model, prefix in ((bos_llama_dir, ["<bos>"]), (llama_dir, [])):
        raw = small_config(model, corpus_dir, domains=[f"text:{corpus_dir / n}.txt" for n in ("alpha", "beta")],
                           method="sparsegpt", calibration={"nsamples": 4}, evaluation={"max_tokens": 512})
        run = ContinualRun(build_config(raw), tmp_path / model.name)
        assert list(run.session.domains.start.tokens) == prefix
        if prefix:
            assert all((run.session.domains.samples(d)[:, 0] == run.session.tokenizer.bos_token_id).all()
                       for d in run.session.domains)
        run.run()
        record = read_json(tmp_path / model.name / "steps" / "2" / "step.json")
        assert record["tokenization"]["prefix"] == prefix
        environment = record["environment"]
        assert environment["threads"] == torch.get_num_threads() and environment["device"] == "cpu"
        assert environment["dtype"] == "float32" and environment["torch"] == torch.__version__
        assert {"blas", "cpu_capability"} <= environment.keys()
        result = run.replay(2)
        assert result.differing == [] and result.verified and result.threads == environment["threads"]


def test_lm_eval_gets_the_bos_too(bos_llama_dir, llama_dir, tiny_task, monkeypatch):
    import lm_eval.models.huggingface as hf
    from transformers import AutoModelForCausalLM

    from copal.lm_eval_tasks import evaluate_tasks

    folder, _, _ = tiny_task
    seen = []
    original = hf.HFLM.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("add_bos_token"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(hf.HFLM, "__init__", spy)
    for model_dir in (bos_llama_dir, llama_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        evaluate_tasks(model, _tokenizer(model_dir), ["copal_test_tiny"], folder, limit=2)
    assert seen == [True, None]


def test_a_window_needs_room_for_text_after_the_bos(bos_tokenizer_dir, corpus_dir, data_dir):
    from copal.data import ingest
    from copal.windows import evaluation_windows
    from copal.errors import InputError

    with pytest.raises(InputError, match="leaves 1 text token"):
        evaluation_windows(ingest(f"text:{corpus_dir / 'alpha'}.txt"), _tokenizer(bos_tokenizer_dir), 2, 100)
