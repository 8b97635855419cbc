"""Any HF causal LM: blocks and prunable linears are found generically."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from conftest import FAMILIES, build_model_dir, tiny_config
from copal.errors import InputError
from copal.model import DenseWeights, all_prunable, find_blocks, load_model, weight_matrix


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_and_linears_found(family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    prefix, blocks = find_blocks(model)
    assert len(blocks) == 2
    linears = all_prunable(model)
    assert linears, family
    embeddings = {id(m) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    for name, module in linears.items():
        assert name.startswith(prefix + ".")
        assert isinstance(module, (torch.nn.Linear, Conv1D))
        assert id(module) not in embeddings and module is not head
    # every Linear/Conv1D inside the blocks is covered, none outside them
    inside = {id(m) for m in blocks.modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    assert inside == {id(m) for m in linears.values()}


def test_conv1d_weight_is_seen_as_out_by_in():
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    c_fc = all_prunable(model)["transformer.h.0.mlp.c_fc"]
    assert isinstance(c_fc, Conv1D)
    assert tuple(weight_matrix(c_fc).shape) == (256, 64)  # out = 4·64, in = 64


def test_model_without_blocks_is_an_input_error():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    with pytest.raises(InputError, match="no decoder blocks"):
        find_blocks(model)


def test_dense_weights_are_read_back_from_safetensors(tmp_path, tokenizer_dir):
    folder = build_model_dir(tmp_path / "m", "gpt2", tokenizer_dir)
    model, _ = load_model(str(folder))
    dense = DenseWeights(model, str(folder))
    assert not dense._copies  # all served from the files, no second copy in memory
    for name, module in all_prunable(model).items():
        original = weight_matrix(module).detach().clone()
        with torch.no_grad():
            module.weight.zero_()
        assert torch.equal(dense.get(name), original)


@pytest.mark.parametrize("damage", ["no_weights", "pickle_only", "corrupt", "no_config"])
def test_bad_model_directories(tmp_path, tokenizer_dir, damage):
    folder = build_model_dir(tmp_path / "m", "llama", tokenizer_dir)
    weights = folder / "model.safetensors"
    if damage == "no_weights":
        weights.unlink()
    elif damage == "pickle_only":
        weights.rename(folder / "pytorch_model.bin")
    elif damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (folder / "config.json").unlink()
    with pytest.raises(InputError, match=str(folder)):
        load_model(str(folder))
