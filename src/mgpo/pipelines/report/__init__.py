"""``mgpo report DIR...``: figures, tables and statistics from sweep folders (or single run folders), written as
``report.md``, a self-contained ``report.html`` (figures embedded), ``runs.csv`` and ``figures/*.png``.

Per experiment (one sweep folder, or all loose run folders together):

- loss curves, one panel per grid value other than method and seed (e.g. rank or learning rate), methods overlaid,
  raw (each seed) faint and smoothed (mean over seeds) bold, shared axes (paper Figures 2-3);
- the double-descent measure and instability count per method and panel (definitions in docs/experiments.md);
  curves and measure use the clean-loss probe (``clean_loss``) where a run logged it, else the loss as trained
  (for MGPO, MSAM and the noise methods the loss at the perturbed weights), and say which;
- the method table: the primary metric, mean +- std over seeds, best in bold (paper Tables 1, 2, 4), with a bar
  chart of the same numbers (paper Figure 4);
- each method minus the baseline, paired by panel and seed, with a 95% t interval; the same for the final clean
  loss and the clean loss's double-descent rise where runs logged the probe;
- the cost table: trainable parameters, peak memory, time per step, each relative to the baseline (Table 3).

The package, by concern: :mod:`.collect` reads run folders, :mod:`.analysis` and :mod:`.tables` compute the
numbers (each table a function returning a dataclass), :mod:`.verdicts` the across-experiments table,
:mod:`.figures` draws, :mod:`.render` writes the documents and :mod:`.make` puts them together. Importing it loads
no machine-learning library (transformers, torch, PEFT).
"""

from __future__ import annotations

from mgpo.pipelines.report.analysis import Analysis, analyse
from mgpo.pipelines.report.collect import (
    STATUS_SAID,
    Experiment,
    RunResult,
    collect,
    loose_differences,
    loss_description,
)
from mgpo.pipelines.report.figures import plot_curves, plot_dd, plot_metric_bars, plot_verdicts
from mgpo.pipelines.report.labels import (
    ADAPTER_NAMES,
    CLEAN_LOSS_DIFFS,
    DASH_SUFFIXES,
    DIAGNOSTICS,
    LOSS_KINDS,
    LOWER_IS_BETTER,
    MEAN_OF_PANELS,
    METHOD_FIELDS,
    METHOD_SUFFIX,
    NO_CAP,
    POOLED,
    PRESET_SUFFIX,
    PRIMARY_METRICS,
    STALLED_FALL,
    higher_is_better,
    mean_std_cell,
    method_label,
    trains_at_perturbed_weights,
)
from mgpo.pipelines.report.make import make_report
from mgpo.pipelines.report.render import CSS, write_html, write_markdown, write_runs_csv
from mgpo.pipelines.report.tables import Differences, MethodTable, Table
from mgpo.pipelines.report.verdicts import verdict_table

__all__ = [
    "ADAPTER_NAMES",
    "Analysis",
    "CLEAN_LOSS_DIFFS",
    "CSS",
    "DASH_SUFFIXES",
    "DIAGNOSTICS",
    "Differences",
    "Experiment",
    "LOSS_KINDS",
    "LOWER_IS_BETTER",
    "MEAN_OF_PANELS",
    "METHOD_FIELDS",
    "METHOD_SUFFIX",
    "MethodTable",
    "NO_CAP",
    "POOLED",
    "PRESET_SUFFIX",
    "PRIMARY_METRICS",
    "RunResult",
    "STALLED_FALL",
    "STATUS_SAID",
    "Table",
    "analyse",
    "collect",
    "higher_is_better",
    "loose_differences",
    "loss_description",
    "make_report",
    "mean_std_cell",
    "method_label",
    "plot_curves",
    "plot_dd",
    "plot_metric_bars",
    "plot_verdicts",
    "trains_at_perturbed_weights",
    "verdict_table",
    "write_html",
    "write_markdown",
    "write_runs_csv",
]
