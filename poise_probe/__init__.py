"""poise_probe: RLVR with a value baseline from a probe on the policy's own internal states."""
__version__ = "0.1.0"
