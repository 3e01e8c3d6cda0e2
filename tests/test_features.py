"""POISE features: spans, pooling inside the hook, and equivalence with output_hidden_states."""
from __future__ import annotations

import pytest
import torch

from poise_probe.features import (TagIds, pack_rollouts, policy_forward, response_spans)
from poise_probe.losses import entropy_from_logits

T = TagIds(think_open=5, think_close=6, answer_open=7, answer_close=8)


@pytest.mark.parametrize("resp, window, vec, reasoning, answer", [
    # <think> a b c </think> <answer> d </answer> eos
    ([5, 20, 21, 22, 6, 7, 23, 8, 3], 3, (2, 5), (1, 4), (6, 7)),
    ([5, 20, 21, 22, 6, 7, 23, 8, 3], 10, (0, 5), (1, 4), (6, 7)),   # fewer than n tokens: all
    ([5, 20, 21, 22, 23], 2, (3, 5), (1, 5), (0, 0)),               # no </think>: last n, unclosed
    ([20, 21, 6, 22, 23], 2, (1, 3), (0, 2), (3, 5)),               # template-opened think
    ([20, 21, 22], 2, (1, 3), (0, 3), (0, 0)),                      # no tags: all reasoning
    ([20, 7, 21, 22], 4, (0, 4), (0, 4), (2, 4)),                   # unclosed <answer>
    ([], 4, (0, 0), (0, 0), (0, 0)),                                # empty response
    ([5, 20, 6, 21, 6, 7, 22, 8], 2, (3, 5), (1, 4), (6, 7)),       # last </think> counts
])
def test_response_spans(resp, window, vec, reasoning, answer):
    sp = response_spans(resp, T, window)
    assert sp.reasoning_vec == vec and sp.reasoning == reasoning and sp.answer == answer


def _reference(model, prompts, responses, layer, tags, pw, rw, temperature):
    """Features from a separate unbatched pass with output_hidden_states (no hooks)."""
    out = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        o = model(ids, output_hidden_states=True)
        h = o.hidden_states[layer + 1][0]                      # output of block `layer`
        k = min(pw, len(p))
        pv = h[len(p) - k:len(p)].mean(0)
        sp = response_spans(r, tags, rw)
        lo, hi = sp.reasoning_vec
        rv = h[len(p) + lo:len(p) + hi].mean(0) if hi > lo else torch.zeros(h.shape[-1])
        logits = o.logits[0, len(p) - 1:len(p) + len(r) - 1] / temperature
        ent = entropy_from_logits(logits) if r else torch.zeros(0)
        def span_mean(a, b):
            return ent[a:b].mean() if b > a else torch.tensor(0.0)
        stats = torch.stack([span_mean(0, len(r)), span_mean(*sp.reasoning),
                             span_mean(*sp.answer)])
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1) \
            if r else torch.zeros(0)
        out.append((torch.cat([pv, rv, stats]), lp))
    return out


@pytest.mark.parametrize("layout", ["verl", "left", "right"])
def test_pooled_features_match_output_hidden_states(tiny_model_dir, layout):
    from poise_probe.models import load_policy

    model, tok = load_policy(tiny_model_dir)
    tags = TagIds.from_tokenizer(tok)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc("<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"),
               enc("<|im_start|>user\nEvaluate T&F.<|im_end|>\n<|im_start|>assistant\n"),
               enc("hi"), enc("<|im_start|>user\nWhat does this print?\na=1\nprint(a)")]
    responses = [enc("<think>1+2=3</think><answer>3</answer><|im_end|>"),
                 enc("<think>T&F is F"),                 # no </think>
                 enc("<answer>x</answer>"),              # fewer tokens than the window
                 []]                                     # empty response
    layer, pw, rw, temp = 0, 10, 10, 0.7  # not the last block: its hidden_states entry is normed
    batch = pack_rollouts(prompts, responses, tok.pad_token_id, layout=layout)
    spans = [response_spans(r, tags, rw) for r in responses]
    with torch.no_grad():
        out = policy_forward(model, batch, temperature=temp, capture_layer=layer, spans=spans,
                             prompt_window=pw)
        ref = _reference(model, prompts, responses, layer, tags, pw, rw, temp)
    d = model.config.hidden_size
    assert out.features.shape == (4, 2 * d + 3)
    for i, (feat, lp) in enumerate(ref):
        torch.testing.assert_close(out.features[i], feat, atol=1e-5, rtol=1e-5)
        n = len(responses[i])
        torch.testing.assert_close(out.log_probs[i, :n], lp, atol=1e-5, rtol=1e-5)
        assert (out.log_probs[i, n:] == 0).all()
    assert (out.features[3, d:2 * d] == 0).all()         # empty response: zero vector
    assert (out.features[3, -3:] == 0).all()             # and zero entropies


def test_no_second_forward_and_hook_removed(tiny_model_dir):
    from poise_probe.features import find_decoder_layers
    from poise_probe.models import load_policy

    model, tok = load_policy(tiny_model_dir)
    calls = []
    model.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    batch = pack_rollouts([[2, 30, 31]], [[40, 41, 3]], tok.pad_token_id)
    spans = [response_spans([40, 41, 3], TagIds.from_tokenizer(tok), 4)]
    with torch.no_grad():
        policy_forward(model, batch, capture_layer=0, spans=spans)
    assert len(calls) == 1
    assert all(not layer._forward_hooks for layer in find_decoder_layers(model))


def test_out_of_range_layer_is_refused(tiny_model_dir):
    from poise_probe.models import load_policy

    model, tok = load_policy(tiny_model_dir)
    batch = pack_rollouts([[2, 30]], [[40, 3]], tok.pad_token_id)
    spans = [response_spans([40, 3], TagIds.from_tokenizer(tok), 4)]
    with pytest.raises(ValueError, match="out of range"):
        policy_forward(model, batch, capture_layer=7, spans=spans)


def test_log_probs_carry_gradients(tiny_model_dir):
    from poise_probe.models import load_policy

    model, tok = load_policy(tiny_model_dir)
    batch = pack_rollouts([[2, 30, 31], [2, 33]], [[40, 41, 3], [42]], tok.pad_token_id)
    out = policy_forward(model, batch, with_entropy=False)
    out.log_probs.sum().backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
