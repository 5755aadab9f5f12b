"""Training: one loop (loop.py) for every objective (objectives.py: a LLaMA's next-token prediction, BERT's
MLM + NSP, a classifier's fine-tuning), its config, data, checkpoints, torchrun support and plots."""

from camelid.train.config import TrainConfig, load_config
from camelid.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_config", "train"]
