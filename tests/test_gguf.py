"""`copal import-gguf`: a tiny GGUF written here with the gguf package's GGUFWriter
(a 2-block llama with a byte-level BPE tokenizer in its metadata, quantised like a
real file: Q8_0 embeddings, Q4_1 matrices) round-trips into a plain HF directory."""

import hashlib
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_one_line_error, tiny_config
from cli import app

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

runner = CliRunner()

CHAT_TEMPLATE = "{% for m in messages %}<eos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
TEXT = "def parse(text):\n    return json.loads(text)  # 2024 tokens, ünïcode"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py), which a GGUF stores and transformers undoes."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_tiny_gguf(path, tokenizer_dir, tied: bool):
    """A random 2-block llama as GGUF. Returns ({gguf name: (stored array, ggml type)}, the HF state dict).

    Block 0 keeps q/k in F32 (so the converted weights must equal the HF originals exactly:
    the permutation undone); everything else is quantised."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = tied
    torch.manual_seed(1)
    hf = {k: v.numpy() for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads

    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]
    tokens = [token for token, _ in sorted(vocab["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(3)  # mostly Q4_1
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token == "<eos>" else 1 for token in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<eos>"))
    writer.add_eos_token_id(tokens.index("<eos>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    stored = {}

    def add(name, array, qtype=Q.F32):
        array = np.ascontiguousarray(array, dtype=np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
        stored[name] = (quantize(array, qtype) if qtype != Q.F32 else array, qtype)

    add("token_embd.weight", hf["model.embed_tokens.weight"], Q.Q8_0)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        qk = Q.F32 if i == 0 else Q.Q4_1
        add(f"blk.{i}.attn_norm.weight", hf[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", permute(hf[p + "self_attn.q_proj.weight"], heads, heads), qk)
        add(f"blk.{i}.attn_k.weight", permute(hf[p + "self_attn.k_proj.weight"], heads, kv_heads), qk)
        add(f"blk.{i}.attn_v.weight", hf[p + "self_attn.v_proj.weight"], Q.Q4_1)
        add(f"blk.{i}.attn_output.weight", hf[p + "self_attn.o_proj.weight"], Q.Q4_1)
        add(f"blk.{i}.ffn_norm.weight", hf[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", hf[p + "mlp.gate_proj.weight"], Q.Q4_1)
        add(f"blk.{i}.ffn_up.weight", hf[p + "mlp.up_proj.weight"], Q.Q4_1)
        add(f"blk.{i}.ffn_down.weight", hf[p + "mlp.down_proj.weight"], Q.Q4_1)
    add("output_norm.weight", hf["model.norm.weight"])
    if not tied:
        add("output.weight", hf["lm_head.weight"], Q.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored, hf, config


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def converted(request, tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("gguf")
    path = root / "tiny.Q4_1.gguf"
    stored, hf, config = write_tiny_gguf(path, tokenizer_dir, tied=request.param)
    result = invoke("import-gguf", path, root / "out")
    assert result.exit_code == 0, result.output
    return path, root / "out", stored, hf, config, result


def _dense(stored, name):
    array, qtype = stored[name]
    return torch.from_numpy(dequantize(array, qtype) if qtype != Q.F32 else array)


def test_directory_is_a_plain_hf_model(converted):
    path, out, _, _, config, result = converted
    assert sorted(f.name for f in out.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "gguf_source.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved and saved["architectures"] == ["LlamaForCausalLM"]
    assert saved["tie_word_embeddings"] == config.tie_word_embeddings
    source = json.loads((out / "gguf_source.json").read_text())
    assert source["file"] == path.name
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["architecture"] == "llama" and source["dtype"] == "float32"
    assert not list(out.parent.glob(".out.partial"))
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"wrote {out}: LlamaForCausalLM") and path.name in lines[-1]


def test_weights_are_the_gguf_tensors_unpermuted(converted):
    from safetensors.torch import load_file

    _, out, stored, hf, config, _ = converted
    weights = load_file(out / "model.safetensors")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    # block 0's q/k were stored unquantised in llama.cpp's row order: undone, they are the originals
    for name in ("q_proj", "k_proj"):
        key = f"model.layers.0.self_attn.{name}.weight"
        assert torch.equal(weights[key], torch.from_numpy(hf[key]))
    # quantised tensors are exactly the GGUF's values, un-quantised (and un-permuted for q/k)
    unpermute = {"q": heads, "k": kv_heads}
    for which, n in unpermute.items():
        expected = _dense(stored, f"blk.1.attn_{which}.weight")
        back = expected.reshape(n, expected.shape[0] // n // 2, 2, -1).transpose(1, 2).reshape(expected.shape)
        assert torch.equal(weights[f"model.layers.1.self_attn.{which}_proj.weight"], back)
    for gguf_name, hf_name in [("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
                               ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                               ("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight")]:
        assert torch.equal(weights[hf_name], _dense(stored, gguf_name)), hf_name
    if not config.tie_word_embeddings:
        assert torch.equal(weights["lm_head.weight"], _dense(stored, "output.weight"))


def test_logits_equal_the_model_loaded_from_the_gguf(converted):
    from transformers import AutoModelForCausalLM

    path, out, _, _, _, _ = converted
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not getattr(plain, "is_quantized", False)
    ids = torch.randint(0, direct.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, direct(ids).logits)


def test_tokenizer_and_chat_template_round_trip(converted, tokenizer_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    _, out, _, _, _, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(out)
    original = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == original(TEXT)["input_ids"]
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.eos_token == "<eos>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<eos>user: hi\n"


def test_bfloat16(tmp_path, converted):
    from safetensors import safe_open

    path = converted[0]
    assert invoke("import-gguf", path, tmp_path / "bf16", "--dtype", "bfloat16").exit_code == 0
    with safe_open(str(tmp_path / "bf16/model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16/gguf_source.json").read_text())["dtype"] == "bfloat16"


def test_a_crash_leaves_no_directory(tmp_path, converted, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        invoke("import-gguf", converted[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _unsupported_gguf(path):
    writer = gguf.GGUFWriter(str(path), "rwkv7")  # a llama.cpp architecture transformers does not read
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("case", ["missing", "not_gguf", "truncated", "unsupported", "not_empty", "dtype"])
def test_bad_input_is_exit_2(tmp_path, case, converted):
    path, out = converted[0], tmp_path / "new"
    needles = []
    if case == "missing":
        path, needles = tmp_path / "nope.gguf", ["nope.gguf", "not found"]
    elif case == "not_gguf":
        path = tmp_path / "model.gguf"
        path.write_text("<html>404</html>")
        needles = ["model.gguf", "not a GGUF file"]
    elif case == "truncated":
        path = tmp_path / "cut.gguf"
        path.write_bytes(converted[0].read_bytes()[:100])
        needles = ["cut.gguf", "unreadable GGUF header"]
    elif case == "unsupported":
        path, needles = _unsupported_gguf(tmp_path / "rwkv.gguf"), ["rwkv.gguf", "'rwkv7'", "cannot load it"]
    elif case == "not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        needles = [str(out), "not empty"]
    args = ["import-gguf", path, out] + (["--dtype", "float16"] if case == "dtype" else [])
    if case == "dtype":
        needles = ["--dtype float16"]
    assert_one_line_error(invoke(*args), *needles)
    if case == "not_empty":
        assert [f.name for f in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
