"""TrainState round trips and checkpoints: what resume restores is what was saved."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from poise_probe.checkpoint import load_checkpoint, resume, save_checkpoint
from poise_probe.data import PromptStream
from poise_probe.models import load_policy
from poise_probe.probe import ProbeBank
from poise_probe.rundir import RunWriter
from poise_probe.state import TrainState, derive_seed


def make_state(model_dir, seed=0) -> tuple[TrainState, object]:
    torch.manual_seed(seed)
    model, tok = load_policy(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    bank = ProbeBank({"all": 64}, alpha=1.0, min_steps_to_fit=1)
    stream = PromptStream(["arith"], {}, seed=0, pool_size=16)  # the run's data seed
    return TrainState(model, opt, sched, bank, stream), tok


def advance(state: TrainState, step: int) -> None:
    """One fake step that touches every part of the state."""
    loss = sum(p.square().sum() for p in state.model.parameters())
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad()
    state.scheduler.step()
    state.stream.next(3)
    rng = np.random.default_rng(step)
    d = 2 * state.model.config.hidden_size + 3
    state.bank.update(rng.normal(size=(4, d)), rng.random(4), np.array([0, 0, 1, 1]),
                      ["math"] * 4, step)
    torch.rand(1)
    state.step = step


def test_checkpoint_round_trip_restores_everything(tiny_model_dir, tmp_path):
    a, tok = make_state(tiny_model_dir)
    for s in (1, 2):
        advance(a, s)
    writer = RunWriter(tmp_path / "run", config={}, meta={"model": "m", "device": "cpu",
                                                          "algorithm": "poise"})
    save_checkpoint(writer, a, tok)
    writer.close("finished")
    expected_next = (a.stream.next(2), torch.rand(3))
    b, _ = make_state(tiny_model_dir, seed=5)
    writer2 = RunWriter(tmp_path / "run", config={}, resume=True,
                        meta={"model": "m", "device": "cpu", "algorithm": "poise"})
    assert resume(writer2, b) == 2 and b.step == 2
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert b.optimizer.state_dict()["state"].keys() == a.optimizer.state_dict()["state"].keys()
    assert b.scheduler.state_dict() == a.scheduler.state_dict()
    sa, sb = a.bank.state_dict(), b.bank.state_dict()
    assert sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)
    got = (b.stream.next(2), torch.rand(3))
    assert [p.example.prompt_id for p in got[0]] == [p.example.prompt_id for p in expected_next[0]]
    assert torch.equal(got[1], expected_next[1])


def test_state_dict_round_trip_in_memory(tiny_model_dir):
    a, _ = make_state(tiny_model_dir)
    advance(a, 1)
    sd = a.state_dict()
    b, _ = make_state(tiny_model_dir, seed=3)
    b.load_state_dict(sd)
    assert b.step == 1
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    with pytest.raises(ValueError, match="probe_bank"):
        b.load_state_dict({k: v for k, v in sd.items() if k != "probe_bank"})


def test_damaged_checkpoint_names_the_folder(tiny_model_dir, tmp_path):
    a, tok = make_state(tiny_model_dir)
    advance(a, 1)
    writer = RunWriter(tmp_path / "run", config={}, meta={"model": "m", "device": "cpu",
                                                          "algorithm": "poise"})
    folder = save_checkpoint(writer, a, tok)
    for f in (folder / "policy").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="step_000001"):
        load_checkpoint(folder)


def test_derive_seed_is_stable_and_separates_purposes():
    assert derive_seed(0, 1, "update") == derive_seed(0, 1, "update")
    assert len({derive_seed(0, 1, "update"), derive_seed(0, 2, "update"),
                derive_seed(0, 1, 1), derive_seed(1, 1, "update")}) == 4
