"""ARM training: preference data (data.py), the GenARM loss (loss.py), the run loop and checkpoints (run.py), the
settings (config.py) and train() (trainer.py). torch, transformers and peft load only when training starts.

    from genarm_local.train import TrainConfig, train
"""

from .config import TrainConfig
from .trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
