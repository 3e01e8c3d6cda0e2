"""POISE inside other training engines: thin adapters over this project's POISE core.

- `poise_probe.integrations.trl`: a `trl.GRPOTrainer` subclass (accelerate scales it out).
- `poise_probe.integrations.verl`: a verl plugin (`verl.plugins` entry point) registering the
  `poise` advantage estimator and the actor-side feature capture.

Both reuse the core unchanged: features (`poise_probe.features`), the probe bank
(`poise_probe.probe.ProbeBank`), the estimator with its bootstrap splice
(`poise_probe.advantages.poise_with_bootstrap`) and the run-directory writer
(`poise_probe.rundir.RunWriter`), so `poise dashboard` opens what these engines produce.
"""
