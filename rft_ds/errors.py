"""The one-line errors a run raises on bad input, before expensive work, on every rank. In a module that
imports nothing of rft_ds, so any module can raise them without importing the one that owns the field
(config, data, rewards, checkpoints): that is what tied config, lora, checkpoint and distributed in a circle."""


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


class DataError(ValueError):
    """Bad prompt data; the message names the prompt, file line or field."""


class RewardError(ValueError):
    """A reward term misbehaved; the message names the term and the sample."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message says why."""
