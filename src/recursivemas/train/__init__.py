"""Training RecursiveLinks (SPEC §6): configs, data, objectives, the accelerate-based trainer."""

from recursivemas.train.config import TrainConfig
from recursivemas.train.trainer import Trainer, TrainReport

__all__ = ["TrainConfig", "TrainReport", "Trainer"]
