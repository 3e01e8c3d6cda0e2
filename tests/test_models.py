"""Loading policies: the bundled tiny reasoner, from_pretrained round trips, clear refusals."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from poise_probe.models import TINY_REASONER_PATH, build_char_tokenizer, load_policy


def test_char_tokenizer_round_trip_and_tags():
    tok = build_char_tokenizer()
    text = "Compute 3+4.\n<think>3+4=7</think><answer>7</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1
    # tags are not special: skipping special tokens keeps them, drops the chat markers
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(chat + "<think>x</think><|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\nassistant\n<think>x</think>"


def test_from_pretrained_round_trip(tiny_model_dir):
    model, tok = load_policy(tiny_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([tok("<think>1+1=2</think>", add_special_tokens=False)["input_ids"]])
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert AutoTokenizer.from_pretrained(tiny_model_dir).decode(ids[0]) == "<think>1+1=2</think>"


@pytest.mark.skipif(not (TINY_REASONER_PATH / "config.json").exists(),
                    reason="bundled model not built yet")
def test_bundled_tiny_reasoner_loads_with_plain_transformers():
    model = AutoModelForCausalLM.from_pretrained(TINY_REASONER_PATH)
    tok = AutoTokenizer.from_pretrained(TINY_REASONER_PATH)
    assert model.config.model_type == "qwen3"
    assert model.config.num_hidden_layers >= 6
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 10e6
    size = sum(f.stat().st_size for f in TINY_REASONER_PATH.glob("*.safetensors"))
    assert 0 < size < 20e6
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                   add_generation_prompt=True).endswith("assistant\n")
    m2, _ = load_policy("tiny-reasoner")
    assert sum(p.numel() for p in m2.parameters()) == n


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(tmp_path / "nope")


def test_dir_without_config_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="no config.json"):
        load_policy(tmp_path)


def test_corrupt_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json could not be read"):
        load_policy(tmp_path)


def test_non_causal_lm_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, vocab_size=100)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'bert' model .*not a causal LM"):
        load_policy(tmp_path)


def test_model_without_tokenizer_is_refused(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no usable tokenizer"):
        load_policy(tmp_path)


def test_config_records_architecture(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"]
