"""``mgpo tune``: an Optuna study over the perturbation's radius (optionally also lr, max_scale, apn) for one model
and task, scored on the validation split, with LoRA without perturbation as trial 0.

Each trial is a short ``mgpo train`` run in its own folder (``trials/trial-NNNN``), started through the sweep
executors' :func:`~mgpo.pipelines.executors.train_run`. Workers (threads here, each with its own GPU or share of
the cores; or Slurm array tasks) pull trials from one shared study, which lives in a database: SQLite in the tune
folder by default, or any SQLAlchemy URL (``--storage``, e.g. PostgreSQL for workers on many machines).

- **Scoring**: the task's validation metric (accuracy; Pearson r for regression), or the
  validation loss with ``tune.metric: loss``. Never the training loss, never the test split.
- **Pruning**: at each validation evaluation a trial reports its score, and Optuna's pruner (median or
  Hyperband) may stop it (SIGTERM: mgpo train ends its step and stops). LoRA's trials are never pruned, nor are
  seed re-runs.
- **Resume**: rerunning the command continues the same study. A trial left running by a killed session is
  marked failed and queued again with the same settings; only completed and pruned search trials count towards
  ``tune.trials``, so none is counted twice.
- **Seeds**: ``--seeds S`` re-runs the ``tune.top`` best settings and LoRA with S seeds each, paired by seed.

The outputs (tune.md, trials.csv, score-vs-rho.png, best.yaml) are written by :mod:`mgpo.pipelines.tune_report`.
"""

from mgpo.pipelines.tune.config import BASELINE, PARAMS, SEARCH, SEEDS, Space, Tune, TuneConfig, load_tune
from mgpo.pipelines.tune.study import counts, open_study, queue_seeds, recover
from mgpo.pipelines.tune.workers import TrialFailed, run_tune

__all__ = [
    "BASELINE",
    "PARAMS",
    "SEARCH",
    "SEEDS",
    "Space",
    "Tune",
    "TuneConfig",
    "TrialFailed",
    "counts",
    "load_tune",
    "open_study",
    "queue_seeds",
    "recover",
    "run_tune",
]
