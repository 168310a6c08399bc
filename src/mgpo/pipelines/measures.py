"""Numbers for the report: the double-descent measure of a loss curve, an instability count, and paired
t intervals. Plain numpy/scipy; the exact definitions are in docs/experiments.md.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

SMOOTH_FRACTION = 0.05  # default smoothing window: 5% of the logged points (at least 1)
SPIKE_FACTOR = 1.5  # default instability threshold: loss > 1.5 x the running median
CONFIDENCE = 0.95


def default_window(n_points: int) -> int:
    return max(1, int(round(n_points * SMOOTH_FRACTION)))


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average: point i is the mean of the last ``window`` points up to i (fewer at the start)."""
    v = np.asarray(values, dtype=float)
    if window < 1:
        raise ValueError(f"smoothing window={window!r} is invalid: use an integer >= 1.")
    total = np.cumsum(v)
    shifted = np.concatenate([np.zeros(window), total[:-window]]) if len(v) > window else np.zeros(len(v))
    counts = np.minimum(np.arange(1, len(v) + 1), window)
    return (total - shifted[: len(v)]) / counts


def double_descent(steps, losses, window: int | None = None) -> dict:
    """The largest rise of the smoothed training loss above its running minimum.

    With S the smoothed loss and m_i = min(S_0..S_i) its running minimum:
    ``rise`` = max_i (S_i - m_i) at the peak point p; ``rise_rel`` = rise / m_p; ``peak_step`` = step of p;
    ``onset_step`` = step where m_p was reached; ``recover_steps`` = steps from the peak until S first gets back
    to <= m_p (None if it never does). A curve that never rises has rise 0 and no peak.
    ``fall_rel`` = (S_start - min S) / S_start with S_start = S_(w-1), the mean of the first w losses: how far the
    run got below its starting loss at all. A run that never learns never rises much either, so read ``rise``
    only next to a ``fall_rel`` well above 0.
    """
    steps, losses = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
    if len(steps) != len(losses) or len(losses) == 0:
        raise ValueError(
            f"double_descent needs equally long, non-empty steps and losses (got {len(steps)} and {len(losses)})."
        )
    window = window or default_window(len(losses))
    s = smooth(losses, window)
    running_min = np.minimum.accumulate(s)
    rises = s - running_min
    p = int(np.argmax(rises))
    start = s[min(window, len(s)) - 1]
    fall_rel = float((start - running_min[-1]) / start) if start > 0 else 0.0
    result = {
        "window": window,
        "rise": float(rises[p]),
        "rise_rel": 0.0,
        "peak_step": None,
        "onset_step": None,
        "recover_steps": None,
        "recovered": True,
        "fall_rel": fall_rel,
    }
    if rises[p] <= 0:
        return result
    floor = running_min[p]
    onset = int(np.flatnonzero(s[: p + 1] == floor)[-1])
    back = np.flatnonzero(s[p + 1 :] <= floor)
    result.update(
        rise_rel=float(rises[p] / floor) if floor > 0 else float("inf"),
        peak_step=int(steps[p]),
        onset_step=int(steps[onset]),
        recovered=bool(len(back)),
        recover_steps=int(steps[p + 1 + back[0]] - steps[p]) if len(back) else None,
    )
    return result


def instability_count(losses, window: int | None = None, factor: float = SPIKE_FACTOR) -> int:
    """How many logged losses exceed ``factor`` x the median of the (up to) ``window`` losses logged before them."""
    v = np.asarray(losses, dtype=float)
    window = window or default_window(len(v))
    if factor <= 0:
        raise ValueError(f"instability factor={factor!r} is invalid: use a positive multiple of the median.")
    return int(sum(v[i] > factor * np.median(v[max(0, i - window) : i]) for i in range(1, len(v))))


def majority_share(gold, num_labels: int) -> float:
    """Chance for accuracy: the share of examples whose label is the most frequent one (what always guessing it
    scores). Labels outside 0..num_labels-1 (a text-to-text target that is no label word: -1) count as examples
    no guess gets right."""
    gold = np.asarray(gold, dtype=int)
    return float(np.bincount(gold[(gold >= 0) & (gold < num_labels)], minlength=num_labels).max() / len(gold))


def paired_t(a, b, *, confidence: float = CONFIDENCE) -> dict:
    """Mean of the paired differences a - b and its Student t interval, ``mean +- t_(n-1) sd / sqrt(n)``.

    The t interval, not a bootstrap: with the 3-10 seeds a sweep here has, a percentile bootstrap has only
    C(2n-1, n) distinct resamples (126 at n = 5) and its intervals are too narrow (they cover less than they
    claim); the t interval is exact for normal differences and the usual choice at this n. With fewer than two
    pairs, or a non-finite value in a pair (``nonfinite`` counts them: a NaN Pearson r of a collapsed model is a
    failure, not a missing number), there is no interval (``low``/``high`` None). ``significant``: the interval
    excludes 0. ``no_spread``: every pair differs by the same amount, so there is no interval to compute
    (``low`` = ``high`` = the mean, not significant).
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    nonfinite = int((~np.isfinite(d)).sum())
    out = {
        "n": int(len(d)),
        "mean": float(d.mean()) if len(d) else float("nan"),
        "low": None,
        "high": None,
        "significant": False,
        "nonfinite": nonfinite,
        "no_spread": False,
    }
    if len(d) < 2 or nonfinite:
        return out
    if d.std(ddof=1) == 0:  # the same difference in every pair (0 where neither arm's loss ever rose): t is undefined
        out.update(low=out["mean"], high=out["mean"], no_spread=True)
        return out
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    out.update(
        low=out["mean"] - half,
        high=out["mean"] + half,
        significant=bool(out["mean"] - half > 0 or out["mean"] + half < 0),
    )
    return out
