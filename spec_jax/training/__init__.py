"""Training draft heads and draft models: the run's config, the one train loop, its checkpoints and logs."""

from spec_jax.training.checkpoints import Checkpoints, load_params
from spec_jax.training.config import TrainConfig, load_train_config
from spec_jax.training.logs import plot_losses, read_records
from spec_jax.training.loop import (
    TrainingDivergedError,
    TrainResult,
    lr_schedule,
    make_optimizer,
    make_train_step,
    train,
)

__all__ = ["Checkpoints", "TrainConfig", "TrainResult", "TrainingDivergedError", "load_params", "load_train_config",
           "lr_schedule", "make_optimizer", "make_train_step", "plot_losses", "read_records", "train"]
