"""Training, one module per concern:

- ``loop``: ``train()``, the loop that wires the parts below (and nothing else);
- ``setup``: the device, the latent dataset, the optimiser and its learning rate;
- ``rundir``: the run directory, checkpoints, snapshots, resume and rollback;
- ``monitor``: progress, metrics.jsonl, sample grids, periodic evaluation; ``plots``: training.png;
- ``health``: non-finite steps, divergence, stop signals; ``state``: the counters and RNG states a checkpoint holds.

c calibration lives beside the curriculum (``slct.calibration``), the objectives in ``slct.objectives``.
"""

from slct.training.health import TrainingDiverged
from slct.training.loop import TrainResult, train
from slct.training.bands import NOISE_BANDS, noise_band
from slct.training.monitor import Monitor, trim_metrics
from slct.training.plots import plot_metrics
from slct.training.rundir import RESUMABLE_CHANGES, config_differences, describe_difference
from slct.training.setup import build_optimizer, learning_rate, open_dataset, resolve_device
from slct.training.state import TrainState

__all__ = ["train", "TrainResult", "TrainState", "TrainingDiverged", "Monitor", "NOISE_BANDS", "noise_band",
           "trim_metrics", "plot_metrics", "RESUMABLE_CHANGES", "config_differences", "describe_difference",
           "build_optimizer", "learning_rate", "open_dataset", "resolve_device"]
