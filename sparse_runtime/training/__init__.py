"""The fine-tuning engine for sparse models (data, optimiser, loop, checkpoints, processes)."""
from .config import DATA_SOURCES, PRECISIONS, SCHEDULES, TrainConfig
from .data import Example, alpaca_examples, build_datasets, collate
from .engine import DistInfo, Trainer, TrainResult, finetune, init_distributed, prepare_model
from .optim import build_optimizer, lr_factor

__all__ = ["DATA_SOURCES", "PRECISIONS", "SCHEDULES", "TrainConfig", "Example", "alpaca_examples", "build_datasets",
           "collate", "DistInfo", "Trainer", "TrainResult", "finetune", "init_distributed", "prepare_model",
           "build_optimizer", "lr_factor"]
