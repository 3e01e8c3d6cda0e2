"""benchmarks/run.py's bookkeeping (no timing here): the headline keys with machine and date,
goals judged both ways, nulls said as not measured, and BENCHMARKS.md's section replaced in place."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_result(bench) -> dict:
    meta = {"machine": "cpu-x", "date": "2026-12-01"}
    contender = {"s_per_step": {"median": 1.0, "min": 0.9, "max": 1.1},
                 "completion_tok_per_s": {"median": 1000.0, "min": 900.0, "max": 1100.0}}
    ours = dict(contender, stage_share={s: 0.1 for s in bench.STAGES},
                stage_s={s: 0.1 for s in bench.STAGES},
                fwd_tokens={"useful": 100, "padded": 150, "prompt": 40, "response": 60},
                throughput_over_trl=2.5, throughput_over_trl_without_old_pass=3.0,
                speedup_over_before=1.3, step_median_s=1.0)
    return {
        "date": "2026-12-01", "command": "python benchmarks/run.py --suite cpu",
        "machine": {"cpu": "cpu-x", "cores": 2, "memory_gib": 24, "torch": "2.13.0",
                    "torch_threads": 2},
        "peak": dict(meta, fp32_gflops=300.0, bf16_gflops=150.0,
                     tiny_shapes={"attn": {"shape": [64, 128, 128], "fp32_gflops": 20.0}}),
        "trl": dict(meta, contenders={"trl_grpo": contender, "poise": ours, "grpo": ours},
                    peak_fraction={"matmul_params": 2_000_000,
                                   "poise": {"gflop_per_step": 10.0, "gflop_per_s": 30.0,
                                             "fraction_of_fp32_peak": 0.1,
                                             "padded_over_useful": 1.5}}),
        "probe": dict(meta, tiny={"share": 0.03, "step_s": 1.0, "predict_refit_s": 0.01,
                                  "capture": {"capture_s": {"median": 0.02},
                                              "old_pass_without_capture_s": {"median": 0.2}}}),
        "efficiency": None,
    }


def test_headline_has_every_required_key_with_machine_and_date(bench):
    res = fake_result(bench)
    h = bench.headline(res)
    for key in ("trl_throughput_ratio", "probe_overhead_share", "tokens_to_match_grpo8_ratio",
                "cpu_peak_fraction", "gpu_generate_speedup"):
        assert set(h[key]) == {"value", "machine", "date"}, key
    assert h["trl_throughput_ratio"] == {"value": 2.5, "machine": "cpu-x", "date": "2026-12-01"}
    assert h["cpu_peak_fraction"]["value"] == 0.1
    assert h["tokens_to_match_grpo8_ratio"]["value"] is None      # not measured: null
    assert h["gpu_generate_speedup"]["value"] is None


def test_markdown_judges_each_goal_and_names_what_was_not_measured(bench):
    res = fake_result(bench)
    res["headline"] = bench.headline(res)
    md = bench.markdown(res)
    assert md.startswith(bench.BEGIN) and md.endswith(bench.END)
    rows = {line.split("|")[1].strip(" `"): line for line in md.splitlines()
            if line.startswith("| `")}
    assert rows["trl_throughput_ratio"].rstrip().endswith("| yes |")          # 2.5 >= 2
    assert rows["cpu_peak_fraction"].rstrip().endswith("| **no** |")         # 10% < 30%
    assert rows["probe_overhead_share"].rstrip().endswith("| **no** |")      # 3% > 2%
    assert "not measured" in rows["tokens_to_match_grpo8_ratio"]
    assert "not measured" in rows["gpu_generate_speedup"]


def test_the_generated_section_is_replaced_in_place(bench, tmp_path, monkeypatch):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nbefore\n")
    monkeypatch.setattr(bench, "MD", md)
    bench.update_markdown(f"{bench.BEGIN}\none\n{bench.END}")
    md.write_text(md.read_text() + "\nafter\n")
    bench.update_markdown(f"{bench.BEGIN}\ntwo\n{bench.END}")
    text = md.read_text()
    assert text.count(bench.BEGIN) == 1 and "two" in text and "one" not in text
    assert text.index("before") < text.index("two") < text.index("after")


def test_gpu_suite_without_a_gpu_says_so(bench):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench.main(["--suite", "gpu"])
    with pytest.raises(SystemExit, match="unknown sections"):
        bench.main(["--suite", "cpu", "--only", "trl,speed"])
