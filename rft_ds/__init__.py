"""rft_ds: rejection fine-tuning for causal LMs under DeepSpeed ZeRO-3."""

from rft_ds.api import train
from rft_ds.config import ConfigError, RFTConfig, RFTRunConfig, SelectionConfig

__all__ = ["train", "RFTConfig", "RFTRunConfig", "SelectionConfig", "ConfigError"]
__version__ = "0.1.0"
