"""What the commands and the library's own runners (ablate, value-bench) share: the demo recipe
and quieting the libraries' progress bars while ours are drawn. No CLI parsing here."""
from __future__ import annotations

import contextlib

__all__ = ["DEMO_OVERRIDES", "quiet_library_bars"]

#: The demo recipe: the defaults plus what a tiny model on a CPU needs (see poise_tiny.yaml).
DEMO_OVERRIDES = [
    "model.path=tiny-reasoner", "rollout.prompts_per_step=32", "rollout.num_generations=2",
    "optim.lr=5e-5", "optim.warmup_steps=5", "optim.mini_batch_prompts=32",
    "optim.micro_batch_size=64", "optim.micro_batch_tokens=2048",
    "probe.bootstrap_steps=8", "probe.min_steps_to_fit=4",
    "probe.layer=3", "probe.alpha=10.0",
    "trainer.total_steps=60", "data.eval_every=0", "data.eval_n=100", "data.eval_samples=8",
    "trainer.save_every=20",
]


@contextlib.contextmanager
def quiet_library_bars():
    """transformers' and huggingface_hub's own bars ("Loading weights", "Writing model
    shards" at each checkpoint) off while the step bar is drawn: they would draw over it."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    was_on, hub_was_on = hf_logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()                # huggingface_hub's too
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()             # huggingface_hub's too
        if not hub_was_on:
            hub.disable_progress_bars()
        elif not was_on:
            hub.enable_progress_bars()
