"""Pretraining from scratch: tokenizer training, data preparation, and a single- or multi-process loop."""

from camelid.train.config import TrainConfig, load_config
from camelid.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_config", "train"]
