"""Capture: pooling edge cases, backend equivalence, agreement with the trainer, disk format, resume."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from poise_probe.capture import (
    CaptureDataset,
    Capturer,
    CaptureSpec,
    DatasetError,
    capture,
    load_datasets,
    plan_from_run,
)
from poise_probe.capture.collect import parse_pooling, pooling_matrix
from poise_probe.capture.dataset import tensor_name
from poise_probe.features import TagIds, pack_rollouts, policy_forward, response_spans
from poise_probe.models import load_policy
from poise_probe.rundir import RunReader
from run_helpers import run

TAGS = TagIds(think_open=1, think_close=2, answer_open=3, answer_close=4)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_policy(tiny_model_dir)


def _rows(tok, n=7, seed=0):
    """Prompts and responses of varied lengths incl. an empty response and no </think>."""
    rng = np.random.default_rng(seed)
    ids = [i for i in range(5, 90)]
    think = tok("<think>", add_special_tokens=False)["input_ids"]
    close = tok("</think>", add_special_tokens=False)["input_ids"]
    prompts, resps = [], []
    for i in range(n):
        prompts.append(list(rng.choice(ids, size=int(rng.integers(3, 20)))))
        body = list(rng.choice(ids, size=int(rng.integers(0, 25))))
        if i % 3 == 0:
            body = think + body + close + list(rng.choice(ids, size=4))
        resps.append(body if i != 1 else [])
    return prompts, resps


# -- pooling --------------------------------------------------------------------------------

def _weights(prompt, resp, poolings, layout="verl"):
    batch = pack_rollouts([prompt], [resp], pad_id=0, layout=layout)
    w, _ = pooling_matrix(batch, TAGS, poolings)
    return batch, w[0]


def test_reasoning_window_ends_at_last_think_close_inclusive():
    prompt, resp = [9, 9, 9], [1, 10, 11, 12, 2, 3, 13, 4]
    batch, w = _weights(prompt, resp, ["reasoning_last_2", "reasoning_last_50"])
    pos = batch.resp_pos[0]
    # last 2 tokens ending at </think> (index 4): indices 3, 4
    assert torch.nonzero(w[0]).flatten().tolist() == pos[3:5].tolist()
    assert torch.allclose(w[0][pos[3:5]], torch.tensor([0.5, 0.5]))
    # fewer tokens than the window: all of them up to </think>
    assert torch.nonzero(w[1]).flatten().tolist() == pos[0:5].tolist()


def test_no_think_close_uses_last_response_tokens_and_empty_gives_zero():
    _, w = _weights([9, 9], [10, 11, 12, 13], ["reasoning_last_3"])
    assert w[0].sum().item() == pytest.approx(1.0)
    assert (w[0][-3:] > 0).all() and w[0][:-3].sum() == 0     # right-padded: last positions
    _batch, w = _weights([9, 9], [], ["reasoning_last_3", "response_mean", "response_last",
                                     "prompt_last_5"])
    assert w[:3].abs().sum() == 0                                # empty response: zero vectors
    assert w[3].sum().item() == pytest.approx(1.0)               # prompt shorter than window


def test_prompt_window_excludes_padding_in_every_layout():
    for layout in ("verl", "left", "right"):
        batch = pack_rollouts([[7, 8, 9], [5]], [[10, 11], [12, 13, 14]], pad_id=0, layout=layout)
        w, _ = pooling_matrix(batch, TAGS, ["prompt_last_2", "response_mean", "response_last"])
        for i, (plen, rlen) in enumerate([(3, 2), (1, 3)]):
            s = int(batch.prompt_start[i])
            assert torch.nonzero(w[i, 0]).flatten().tolist() == list(range(s + plen - min(2, plen),
                                                                           s + plen))
            rpos = batch.resp_pos[i, :rlen].tolist()
            assert torch.nonzero(w[i, 1]).flatten().tolist() == rpos
            assert torch.nonzero(w[i, 2]).flatten().tolist() == [rpos[-1]]
        assert torch.allclose(w.sum(-1), torch.ones(2, 3))


def test_pooling_names_are_checked():
    assert parse_pooling("prompt_last_10") == ("prompt_last", 10)
    assert parse_pooling("response_mean") == ("response_mean", None)
    for bad in ("prompt_last_0", "mean", "reasoning_last_x"):
        with pytest.raises(ValueError, match="pooling"):
            parse_pooling(bad)
    with pytest.raises(ValueError, match="temperature"):
        CaptureSpec(layers=(0,), temperature=0)


# -- backends and the trainer ------------------------------------------------------------------

def test_backends_equal_output_hidden_states_with_padding_and_repeats(tiny):
    model, tok = tiny
    prompts, resps = _rows(tok)
    spec = CaptureSpec(layers=(0, 1), prompt_windows=(1, 4), reasoning_windows=(3,))
    outs = {}
    for backend in ("nnsight", "hooks"):
        cap = Capturer(model, tok, spec, backend=backend)
        first = cap.run(prompts, resps)
        again = cap.run(prompts, resps)                  # repeated calls: same values
        for layer in spec.layers:
            assert torch.equal(first["pooled"][layer], again["pooled"][layer])
        outs[backend] = first
    batch = pack_rollouts(prompts, resps, tok.pad_token_id)
    w, _ = pooling_matrix(batch, TagIds.from_tokenizer(tok), spec.poolings)
    with torch.no_grad():
        hs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, output_hidden_states=True).hidden_states
    for layer in spec.layers:
        assert torch.allclose(outs["nnsight"]["pooled"][layer], outs["hooks"]["pooled"][layer],
                              atol=1e-6)
        ref = torch.einsum("bpt,btd->bpd", w, hs[layer + 1].float())
        close = torch.allclose(outs["nnsight"]["pooled"][layer], ref, atol=1e-5)
        # HF's last hidden_states entry is after the final norm; resid_post of the last block
        # is the block's own output (as the trainer's hook reads it)
        assert close == (layer < model.config.num_hidden_layers - 1), layer
    # one row alone (no padding) gives the batched row's values
    alone = Capturer(model, tok, spec, backend="hooks").run(prompts[2:3], resps[2:3])
    assert torch.allclose(alone["pooled"][1][0], outs["hooks"]["pooled"][1][2], atol=1e-5)
    np.testing.assert_allclose(alone["entropy_stats"][0], outs["hooks"]["entropy_stats"][2],
                               atol=1e-5)


def test_capture_equals_the_trainers_policy_forward_features(tiny):
    model, tok = tiny
    prompts, resps = _rows(tok, n=6, seed=1)
    tags = TagIds.from_tokenizer(tok)
    spec = CaptureSpec(layers=(1,), prompt_windows=(5,), reasoning_windows=(5,))
    out = Capturer(model, tok, spec).run(prompts, resps)
    batch = pack_rollouts(prompts, resps, tok.pad_token_id)
    with torch.no_grad():
        ref = policy_forward(model, batch, capture_layer=1, prompt_window=5,
                             spans=[response_spans(r, tags, 5) for r in resps])
    mine = np.concatenate([out["pooled"][1][:, 0].numpy(), out["pooled"][1][:, 1].numpy(),
                           out["entropy_stats"]], axis=1)
    np.testing.assert_allclose(mine, ref.features.numpy(), atol=1e-5)
    for i, r in enumerate(resps):
        np.testing.assert_allclose(out["token_entropy"][i], ref.entropies[i, :len(r)].numpy(),
                                   atol=1e-5)
        np.testing.assert_allclose(out["token_logprob"][i], ref.log_probs[i, :len(r)].numpy(),
                                   atol=1e-5)


def test_token_statistics_match_a_reference_from_logits(tiny):
    model, tok = tiny
    prompts, resps = _rows(tok, n=3, seed=2)
    spec = CaptureSpec(layers=(0,), temperature=0.7)
    out = Capturer(model, tok, spec, backend="hooks").run(prompts, resps)
    for i, (p, r) in enumerate(zip(prompts, resps)):
        if not r:
            assert np.all(out["seq_stats"][i] == 0)
            continue
        with torch.no_grad():
            z = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1].float() / 0.7
        prob = torch.softmax(z, -1)
        logp = torch.log_softmax(z, -1)
        ent = -(prob * logp).sum(-1)
        var = (prob * logp ** 2).sum(-1) - ent ** 2
        top = prob.topk(2).values
        ref = torch.stack([ent, var, logp[torch.arange(len(r)), torch.tensor(r)], top[:, 0],
                           top[:, 0] - top[:, 1]], -1).mean(0)
        np.testing.assert_allclose(out["seq_stats"][i], ref.numpy(), atol=1e-5)


def test_out_of_range_layer_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match=r"layer\(s\) \[7\] out of range.*0\.\.1"):
        Capturer(model, tok, CaptureSpec(layers=(0, 7)))


# -- disk format and resume --------------------------------------------------------------------

def _plan(tok, n_prompts=6, k=3, seed=0):
    prompts, resps = _rows(tok, n=n_prompts * k, seed=seed)
    rows = []
    for i, (p, r) in enumerate(zip(prompts, resps)):
        g = i // k
        rows.append({"prompt_id": f"p{g}", "group": f"g{g}", "rollout_idx": i % k, "step": -1,
                     "domain": ["math", "code", "logic"][g % 3], "data_source": "x",
                     "prompt": "q", "completion": tok.decode(r), "reward": float(i % 2),
                     "prompt_token_ids": [int(x) for x in prompts[g * k]],
                     "token_ids": [int(x) for x in r]})
    return pd.DataFrame(rows)


def _capture(tiny, out, plan, **kw):
    model, tok = tiny
    spec = CaptureSpec(layers=(0, 1), prompt_windows=(2, 5), reasoning_windows=(2, 5))
    return capture(model, tok, plan, out, spec, source={"kind": "test"}, batch_size=4,
                   shard_rows=5, **kw)


def test_dataset_round_trip_and_feature_sets(tiny, tmp_path):
    plan = _plan(tiny[1])
    ds = _capture(tiny, tmp_path / "d", plan)
    assert len(ds) == len(plan) == 18 and len(ds.shards) == 4
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["complete"] and m["layers"] == [0, 1] and m["n_rows"] == 18
    idx = ds.index
    assert idx["row"].tolist() == list(range(18))
    assert (idx["num_response_tokens"].to_numpy() == plan["token_ids"].map(len).to_numpy()).all()
    assert ds.poise_features(1, 5).shape == (18, 2 * ds.hidden_size + 3)
    assert ds.design("length", 1, 5).shape == (18, 1)
    # the stored features equal a direct capture of the same rows
    cap = Capturer(*tiny, CaptureSpec(layers=(1,), prompt_windows=(5,), reasoning_windows=(5,)))
    direct = cap.run(list(plan["prompt_token_ids"]), list(plan["token_ids"]))
    np.testing.assert_allclose(ds.pooled(1, "prompt_last_5"), direct["pooled"][1][:, 0].numpy(),
                               atol=1e-6)
    with pytest.raises(DatasetError, match=r"layer 3 was not captured.*\[0, 1\]"):
        ds.pooled(3, "prompt_last_5")
    with pytest.raises(DatasetError, match="pooling 'prompt_last_10' was not captured"):
        ds.pooled(0, "prompt_last_10")
    with pytest.raises(DatasetError, match="unknown feature set"):
        ds.design("everything", 0, 2)


def test_in_memory_dataset_reads_like_the_one_on_disk(tiny, tmp_path):
    disk = _capture(tiny, tmp_path / "d", _plan(tiny[1]))
    tensors = {tensor_name(layer, p): disk.pooled(layer, p) for layer in disk.layers
               for p in disk.poolings}
    tensors.update(entropy_stats=disk.entropy_stats(), seq_stats=disk.seq_stats())
    shape = {"layers": disk.layers, "poolings": disk.poolings, "hidden_size": disk.hidden_size}
    mem = CaptureDataset.from_arrays(disk.index, tensors, **shape)
    assert len(mem) == len(disk) and mem.windows() == disk.windows() == [2, 5]
    for feature_set in ("full", "reasoning", "entropy", "prompt", "length"):
        np.testing.assert_array_equal(mem.design(feature_set, 1, 5),
                                      disk.design(feature_set, 1, 5), err_msg=feature_set)
    np.testing.assert_array_equal(mem.seq_stats(), disk.seq_stats())
    with pytest.raises(DatasetError, match=r"layer 3 was not captured in :memory:"):
        mem.pooled(3, "prompt_last_5")
    missing = {k: v for k, v in tensors.items() if k != "entropy_stats"}
    with pytest.raises(DatasetError, match="lacks the tensor 'entropy_stats'"):
        CaptureDataset.from_arrays(disk.index, missing, **shape)
    short = {**tensors, "layers.1.resid_post.prompt_last_5": tensors["seq_stats"]}
    with pytest.raises(DatasetError, match=r"'layers.1.resid_post.prompt_last_5' has shape "
                                           r"\(18, 5\); expected \(18, \d+\)"):
        CaptureDataset.from_arrays(disk.index, short, **shape)


def test_interrupted_capture_resumes_to_identical_shards(tiny, tmp_path):
    plan = _plan(tiny[1])
    _capture(tiny, tmp_path / "full", plan)
    part = _capture(tiny, tmp_path / "part", plan, stop_after_shards=2)
    assert len(part.shards) == 2
    with pytest.raises(DatasetError, match="capture incomplete, 2 of 4 shards missing"):
        CaptureDataset(tmp_path / "part")
    # a torn temp file of the killed writer is ignored
    (tmp_path / "part" / "shards" / ".shard_000002.safetensors.tmp-1-ab").write_bytes(b"xx")
    resumed = _capture(tiny, tmp_path / "part", plan)
    assert len(resumed) == 18
    for f in sorted((tmp_path / "full" / "shards").glob("shard_*")):
        assert f.read_bytes() == (tmp_path / "part" / "shards" / f.name).read_bytes(), f.name
    assert resumed.index["row"].tolist() == list(range(18))   # no duplicate rows


@pytest.mark.slow
def test_sigkilled_capture_resumes(tiny_model_dir, tmp_path):
    """A real `poise probe capture` killed mid-run, then rerun: every row once."""
    out = tmp_path / "cap"
    cmd = [sys.executable, "-m", "poise_probe", "probe", "capture", "--model",
           str(tiny_model_dir), "--tasks", "arith,boolean", "--prompts", "6", "--samples", "2",
           "--max-new-tokens", "8", "--layers", "0,1", "--shard-rows", "1", "--batch-size", "1",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if list((out / "shards").glob("shard_*.parquet")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the capture ended before it could be killed"
    n_done = len(list((out / "shards").glob("shard_*.parquet")))
    assert 1 <= n_done < 24
    assert not (out / "index.parquet").exists()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr
    ds = CaptureDataset(out)
    assert len(ds) == 24 and ds.index["row"].is_unique
    assert "resumed" in second.stderr


def test_resume_with_another_model_or_settings_is_refused(tiny, tmp_path):
    plan = _plan(tiny[1])
    _capture(tiny, tmp_path / "d", plan, stop_after_shards=1)
    model, tok = tiny
    other = type(model)(model.config)
    with pytest.raises(DatasetError, match="model does not match the captured one"):
        capture(other, tok, plan, tmp_path / "d",
                CaptureSpec(layers=(0, 1), prompt_windows=(2, 5), reasoning_windows=(2, 5)),
                source={"kind": "test"}, batch_size=4, shard_rows=5)
    with pytest.raises(DatasetError, match="layers: was"):
        capture(model, tok, plan, tmp_path / "d",
                CaptureSpec(layers=(0,), prompt_windows=(2, 5), reasoning_windows=(2, 5)),
                source={"kind": "test"}, batch_size=4, shard_rows=5)


def test_malformed_inputs_are_named(tiny, tmp_path):
    plan = _plan(tiny[1])
    bad = plan.copy()
    bad.loc[3, "reward"] = float("nan")
    with pytest.raises(DatasetError, match=r"rollout 3 .*reward nan"):
        _capture(tiny, tmp_path / "nan", bad)
    with pytest.raises(DatasetError, match=r"lack column\(s\) \['domain'\]"):
        _capture(tiny, tmp_path / "col", plan.drop(columns=["domain"]))
    with pytest.raises(DatasetError, match="no manifest.json"):
        CaptureDataset(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        CaptureDataset(tmp_path / "bad")
    with pytest.raises(DatasetError, match="not a folder"):
        CaptureDataset(tmp_path / "missing")


def test_mixing_captures_of_different_settings_is_refused(tiny, tmp_path):
    plan = _plan(tiny[1])
    a = _capture(tiny, tmp_path / "a", plan)
    model, tok = tiny
    capture(model, tok, plan, tmp_path / "b", CaptureSpec(layers=(1,), prompt_windows=(2, 5),
                                                          reasoning_windows=(2, 5)),
            source={"kind": "test"}, batch_size=4, shard_rows=5)
    with pytest.raises(DatasetError, match=r"captured differently \(layers"):
        load_datasets([tmp_path / "a", tmp_path / "b"])
    both = load_datasets([tmp_path / "a", tmp_path / "a"])
    assert len(both) == 2 * len(a)
    assert both.pooled(0, "prompt_last_2").shape == (36, a.hidden_size)
    assert both.index["group"].nunique() == 2 * a.index["group"].nunique()


# -- the trainer's own rollouts ----------------------------------------------------------------

@pytest.mark.slow
def test_capture_of_a_run_reproduces_the_trainers_probe_predictions(tiny_model_dir, tmp_path):
    """Rollouts of step 2 were sampled and scored by checkpoint 1 with probe snapshot 1: the
    capture of those rollouts, through that probe, gives the probe_pred the trainer logged."""
    from poise_probe.probe import RidgeProbe

    out = run(tiny_model_dir, tmp_path / "run", **{"trainer.keep_checkpoints": 5})
    reader = RunReader(out)
    plan, source = plan_from_run(out, steps="2")
    assert source["steps"] == [2] and {"prompt_token_ids", "token_ids"} <= set(plan.columns)
    ckpt = dict(reader.checkpoints())[1] / "policy"
    model, tok = load_policy(ckpt)
    layer = reader.config["probe"]["layer"]
    w = reader.config["probe"]["prompt_window"]
    spec = CaptureSpec(layers=(layer,), prompt_windows=(w,), reasoning_windows=(w,))
    ds = capture(model, tok, plan, tmp_path / "cap", spec, source=source, batch_size=3)
    saved = reader.rollouts(2)
    for mine, theirs in zip(ds.index["token_entropies"], saved["token_entropies"]):
        np.testing.assert_allclose(mine, theirs, atol=1e-5)
    arrays, _meta = reader.probe_snapshot(1)
    (_bucket, probe_arrays), = arrays.items()
    probe = RidgeProbe.from_arrays(probe_arrays)
    pred = probe.predict(ds.poise_features(layer, w))
    np.testing.assert_allclose(pred, saved["probe_pred"].to_numpy(), atol=1e-5)
