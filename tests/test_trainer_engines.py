"""The restructured trainer: engine log-probs and the rollout correction, token-level advantages
through the loop, self-describing rollout records, the train state, GPU recipes without CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from poise_probe.config import load_config
from poise_probe.rundir import RunReader
from test_trainer import run, tiny_overrides


def test_records_describe_themselves(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    out = run(tiny_model_dir, tmp_path / "run", **{"trainer.total_steps": 2})
    r = RunReader(out)
    assert r.meta["schema_version"] == 2 and r.meta["rollout_engine"] == "hf"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    t = r.rollouts(2)
    for row in t.itertuples():
        assert len(row.token_pieces) == len(row.token_ids) == row.num_tokens
        assert "".join(row.token_pieces) == row.completion
        assert tok.decode(list(row.token_ids), skip_special_tokens=True) == row.completion
        for span in (row.reasoning_span, row.answer_span, row.pooled_span):
            assert 0 <= span[0] <= span[1] <= row.num_tokens
        assert len(row.engine_logprobs) == row.num_tokens
        # hf generate and the trainer's forward: the same fp32 model, kernels aside
        np.testing.assert_allclose(row.engine_logprobs, row.token_logprobs, atol=1e-4)
        assert row.token_advantages is None
    # the stored target is the sibling's score (K = 2)
    for _, g in t.groupby("group_id"):
        np.testing.assert_allclose(g.probe_target.to_numpy(), g.score.to_numpy()[::-1])
    m = [x for x in r.metrics() if "reward/mean" in x][-1]
    assert m["rollout/logprob_abs_diff_max"] < 1e-4
    assert "rollout/is_weight_mean" not in m            # auto: off for hf


def test_is_correction_on_hf_weights_tokens_near_one(tiny_model_dir, tmp_path):
    out = run(tiny_model_dir, tmp_path / "is", **{"trainer.total_steps": 1,
                                                 "rollout.is_correction": "true",
                                                 "rollout.is_cap": 1.5})
    m = [x for x in RunReader(out).metrics() if "reward/mean" in x][-1]
    assert m["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert m["rollout/is_clip_frac"] == 0.0


def test_token_level_estimator_trains_and_is_recorded(tiny_model_dir, tmp_path):
    from test_advantages import _register_token_level

    name = _register_token_level()
    out = run(tiny_model_dir, tmp_path / "tok", **{"algorithm.adv_estimator": name,
                                                  "trainer.total_steps": 2})
    r = RunReader(out)
    t = r.rollouts(2)
    for row in t.itertuples():
        ta = np.asarray(row.token_advantages)
        assert len(ta) == row.num_tokens
        if row.num_tokens:
            assert row.advantage == pytest.approx(float(ta.mean()), abs=1e-6)
            np.testing.assert_allclose(ta, ta[0] * 0.5 ** np.arange(len(ta)), rtol=1e-5,
                                       atol=1e-7)
    m = [x for x in r.metrics() if "reward/mean" in x][-1]
    assert np.isfinite(m["actor/pg_loss"]) and m["actor/grad_norm"] > 0


def test_gpu_recipe_without_cuda_stops_unless_device_is_set(tiny_model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from poise_probe.trainer import select_device, train

    for recipe in ("poise_qwen3_0.6b", "poise_qwen3_1.7b", "dapo_qwen3_1.7b"):
        cfg = load_config(f"training/configs/{recipe}.yaml")
        with pytest.raises(RuntimeError, match="model.device=cpu"):
            select_device(cfg)
    cfg = load_config("training/configs/poise_qwen3_0.6b.yaml", ["model.device=cpu"])
    assert select_device(cfg).type == "cpu"
    cfg = load_config(None, tiny_overrides(tiny_model_dir, **{"model.device": "cuda"}))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        train(cfg, tmp_path / "gpu")
    assert not (tmp_path / "gpu").exists()             # nothing written before the check


def test_vllm_engine_without_vllm_says_how_to_get_it(tiny_model_dir, tmp_path):
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.origin is not None:  # not a namespace (a folder named vllm)
        pytest.skip("vllm is installed here; tests/vllm_engine covers it")
    with pytest.raises(ImportError, match="vllm-env"):
        run(tiny_model_dir, tmp_path / "v", **{"rollout.engine": "vllm"})
    assert RunReader(tmp_path / "v").inferred_status() == "failed"


def test_engine_config_is_validated():
    for bad, field in (("rollout.engine=sglang", "rollout.engine"),
                       ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization"),
                       ("rollout.is_cap=0.5", "rollout.is_cap"),
                       ("rollout.max_batch_tokens=0", "rollout.max_batch_tokens")):
        with pytest.raises(ValueError, match=field):
            load_config(None, [bad])
    assert load_config(None, ["rollout.engine=vllm"]).rollout.use_is_correction
    assert not load_config(None, []).rollout.use_is_correction
    assert not load_config(None, ["rollout.engine=vllm",
                                  "rollout.is_correction=false"]).rollout.use_is_correction
