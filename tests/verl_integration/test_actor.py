"""Features from verl's old-log-prob batch layout equal the core's `policy_forward` on the same
rows (a tiny random Qwen3, no Ray, no verl workers)."""
from __future__ import annotations

import pytest
import torch

from poise_probe.features import TagIds, pack_rollouts, policy_forward, response_spans
from poise_probe.integrations.verl.actor import old_log_prob_outputs, packed_from_verl


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def verl_tensors(prompts, responses, pad):
    """verl's rollout layout, built the way its agent loop does: prompts left-padded to P,
    responses right-padded to R, position ids by verl's own compute_position_id_with_mask."""
    from verl.utils.model import compute_position_id_with_mask

    P, R = max(map(len, prompts)), max(map(len, responses))
    b = len(prompts)
    ids = torch.full((b, P + R), pad)
    attn = torch.zeros((b, P + R), dtype=torch.long)
    resp = torch.full((b, R), pad)
    rmask = torch.zeros((b, R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.tensor(p)
        attn[i, P - len(p):P] = 1
        ids[i, P:P + len(r)] = torch.tensor(r)
        attn[i, P:P + len(r)] = 1
        resp[i, :len(r)] = torch.tensor(r)
        rmask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": attn, "responses": resp, "response_mask": rmask,
            "position_ids": compute_position_id_with_mask(attn)}


def test_features_equal_policy_forward(tiny):
    model, tok = tiny
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc("2+3="), enc("is 7 odd? answer:"), enc("x")]
    responses = [enc("<think>5</think><answer>5</answer>"), enc("yes it is"), enc("<think>hm")]
    tags = TagIds.from_tokenizer(tok)
    got = old_log_prob_outputs(model, verl_tensors(prompts, responses, tok.pad_token_id),
                               tags=tags, layer=1, prompt_window=3, temperature=0.7)

    ref_batch = pack_rollouts(prompts, responses, tok.pad_token_id, layout="right")
    spans = [response_spans(r, tags, 3) for r in responses]
    with torch.no_grad():
        ref = policy_forward(model, ref_batch, temperature=0.7, capture_layer=1, spans=spans,
                             prompt_window=3)
    assert got["poise_features"].shape == (3, 2 * model.config.hidden_size + 3)
    torch.testing.assert_close(got["poise_features"], ref.features, atol=1e-5, rtol=1e-5)
    R = got["log_probs"].shape[1]
    torch.testing.assert_close(got["log_probs"], ref.log_probs[:, :R], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["entropy"], ref.entropies[:, :R], atol=1e-5, rtol=1e-5)


def test_right_padded_prompt_is_refused(tiny):
    _, tok = tiny
    t = verl_tensors([[5, 6], [7]], [[8], [9, 10]], tok.pad_token_id)
    t["attention_mask"][1] = torch.tensor([1, 0, 1, 1])  # prompt padding on the right
    with pytest.raises(ValueError, match="left-padded"):
        packed_from_verl(t)


def test_missing_key_is_refused(tiny):
    _, tok = tiny
    t = verl_tensors([[5, 6]], [[8]], tok.pad_token_id)
    del t["response_mask"]
    with pytest.raises(KeyError, match="response_mask"):
        packed_from_verl(t)
