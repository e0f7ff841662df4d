"""Training: the dense baseline, distillation retraining of compressed configs, and the teacher.

`Recipe` says how; `train_dense` and `retrain_compressed` share one resumable loop (`loop.fit`);
`load_teacher` is the one place that decides which dense weights a command starts from."""
from .baseline import pixel_baseline_accuracy
from .dense import train_dense
from .distributed import Dist, init_distributed
from .loop import CONFIG_FILE, METRICS_FILE, MODEL_FILE, STATE_FILE, Checkpoint, Hooks, evaluate, fit, load_batch
from .recipe import DENSE_LR, RETRAIN_LR, Recipe
from .retrain import Retraining, retrain_compressed
from .teacher import Teacher, TrainOnce, load_teacher

__all__ = ["CONFIG_FILE", "Checkpoint", "DENSE_LR", "Dist", "Hooks", "METRICS_FILE", "MODEL_FILE", "RETRAIN_LR", "Recipe",
           "Retraining", "STATE_FILE", "Teacher", "TrainOnce", "evaluate", "fit", "init_distributed", "load_batch",
           "load_teacher", "pixel_baseline_accuracy", "retrain_compressed", "train_dense"]
