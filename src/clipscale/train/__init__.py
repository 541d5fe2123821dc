"""Training: the Trainer (trainer.py: the components and the order of things), one step's forward and
backward over the whole global batch (grad_cache.py), what a run reports (tracker.py), and running a
job on this rank (run.py: `clipscale train`, `python -m clipscale.train` under torchrun or srun)."""

from ..errors import TrainingDiverged
from .run import main, train
from .trainer import Trainer

__all__ = ["Trainer", "TrainingDiverged", "main", "train"]
