"""The stateful members of the method family (`poise_probe.value_methods.ValueMethod`s).

Importing this package registers every one of them under its `algorithm.adv_estimator` name.
"""
from poise_probe.methods import numca  # noqa: F401  (registers "numca")
from poise_probe.methods import hista  # noqa: F401  (registers "hista")
from poise_probe.methods import critic, critic_gae  # noqa: F401  (registers "ppo_critic", "ppo_gae")
from poise_probe.methods import ablations  # noqa: F401  (registers "poise_self", "poise_prompt")
