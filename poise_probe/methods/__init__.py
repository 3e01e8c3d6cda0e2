"""The stateful members of the method family (`poise_probe.value_methods.ValueMethod`s).

Importing this package registers every one of them under its `algorithm.adv_estimator` name.
"""
