"""Samplers turn prompt token ids into completions; see base.Sampler for the contract."""

from rft_ds.sampling.base import Completion, Sampler, finish_completion

__all__ = ["Completion", "Sampler", "finish_completion"]
