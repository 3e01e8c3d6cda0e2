"""The POISE value probe g: a ridge regression on the policy's own features, its buffer and bank.

`RidgeProbe` is `StandardScaler -> optional PCA per feature block -> Ridge(alpha) -> clip`;
`loo_targets` gives each rollout the mean reward of its siblings (the probe's target);
`ProbeBuffer` is the FIFO of recent rows (whole prompt groups evicted, oldest first);
`ProbeBank` keeps one probe and buffer per domain and refits from scratch every step.
Paper: POISE (arXiv 2605.07579), "The probe g".
"""
from poise_probe.probe.bank import DEFAULT_DOMAINS, ProbeBank, ProbeBuffer, loo_targets
from poise_probe.probe.ridge import RidgeProbe

__all__ = ["RidgeProbe", "ProbeBuffer", "ProbeBank", "loo_targets", "DEFAULT_DOMAINS"]
