"""Numbers for the report: the double-descent measures of a loss curve, an instability count, paired t intervals,
intervals over test examples and seeds together, and Holm's correction. Plain numpy/scipy; the exact definitions
are in docs/experiments.md.
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
    mean = float(d.mean()) if len(d) else float("nan")
    out = {
        "n": int(len(d)),
        "mean": mean,
        "low": None,
        "high": None,
        "significant": False,
        "nonfinite": nonfinite,
        "no_spread": False,
        "p": None,
    }
    if len(d) < 2 or nonfinite:
        return out
    if d.std(ddof=1) == 0:  # the same difference in every pair (0 where neither arm's loss ever rose): t is undefined
        out.update(low=mean, high=mean, no_spread=True)
        return out
    se = float(d.std(ddof=1) / np.sqrt(len(d)))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * se)
    out.update(
        low=mean - half,
        high=mean + half,
        significant=bool(mean - half > 0 or mean + half < 0),
        p=float(2 * stats.t.sf(abs(mean) / se, len(d) - 1)),
    )
    return out


def second_descent(steps, losses, window: int) -> dict:
    """A rise and then a fall: the largest ``min(S_i - m_i, S_i - f_i) / m_i`` over the smoothed loss S, with m_i the
    running minimum up to i and f_i the lowest point after i. It is large only where the loss climbed above its
    best so far *and* came down again by as much: a second descent. A curve that only falls scores 0, and so does
    one that rises and stays up (a divergence, which :func:`double_descent`'s rise counts in full)."""
    s = smooth(np.asarray(losses, dtype=float), window)
    if len(s) < 3:
        return {"window": window, "second_descent_rel": 0.0, "second_peak_step": None}
    running_min = np.minimum.accumulate(s)
    after = np.concatenate([np.minimum.accumulate(s[::-1])[::-1][1:], [np.inf]])  # min of S_(i+1..)
    size = np.minimum(s - running_min, s - after)
    size = np.where(np.isfinite(size) & (running_min > 0), size / np.where(running_min > 0, running_min, 1), 0.0)
    i = int(np.argmax(size))
    if size[i] <= 0:
        return {"window": window, "second_descent_rel": 0.0, "second_peak_step": None}
    return {"window": window, "second_descent_rel": float(size[i]), "second_peak_step": int(np.asarray(steps)[i])}


def paired_over_examples_and_seeds(
    a: dict, b: dict, target, stat, *, boots: int = 2000, seed: int = 0, confidence: float = CONFIDENCE
) -> dict:
    """The difference of a metric between two arms over seeds *and* test examples, with an interval for both.

    ``a`` and ``b`` map seed -> per-example predictions (aligned with ``target``: every run scored the same test
    rows); ``stat(predictions, target)`` is the metric (accuracy, Pearson r). The two sources of variation are
    independent: training noise, which differs between seeds (the paired t of :func:`paired_t`, variance
    ``s^2 / n``), and which test examples were drawn, which is shared by every seed and both arms (the variance of
    the seed-mean difference under a bootstrap of the examples: one resample of the example indices per replicate,
    applied to every seed and both arms, so the pairing is kept). The interval is ``mean +- t_(n-1) sqrt(s^2 / n +
    v_examples)``. With one seed there is none (``low``/``high``/``p`` None, as in :func:`paired_t`): the training
    noise is unmeasured, and the interval over examples alone, which a partial sweep would otherwise print as a
    verdict, is kept apart in ``examples_low``/``examples_high`` (normal quantile). Why not a two-stage bootstrap
    over seeds as well: with 5-10 seeds its seed stage has too few distinct resamples (see :func:`paired_t`).
    Returns paired_t's keys (``low``/``high`` the combined interval) plus ``seeds_low``/``seeds_high`` (seeds
    only), ``examples_low``/``examples_high`` (examples only), ``se_examples`` and ``examples``."""
    seeds = sorted(set(a) & set(b))
    target = np.asarray(target, dtype=float)
    per_seed = {s: (np.asarray(a[s], dtype=float), np.asarray(b[s], dtype=float)) for s in seeds}
    diffs = [stat(x, target) - stat(y, target) for x, y in per_seed.values()]
    seed_only = paired_t(diffs, np.zeros(len(diffs)), confidence=confidence)
    rng = np.random.default_rng(seed)
    n = len(target)
    replicate = np.empty(boots)
    for k in range(boots):
        idx = rng.integers(0, n, n)
        t = target[idx]
        replicate[k] = np.mean([stat(x[idx], t) - stat(y[idx], t) for x, y in per_seed.values()])
    v_examples = float(np.nanvar(replicate, ddof=1))
    out = {**seed_only, "seeds_low": seed_only["low"], "seeds_high": seed_only["high"], "examples": n}
    out["se_examples"] = float(np.sqrt(v_examples))
    if not seeds or seed_only["nonfinite"]:
        return out
    z = float(stats.norm.ppf(0.5 + confidence / 2) * out["se_examples"])
    out.update(examples_low=out["mean"] - z, examples_high=out["mean"] + z)
    if len(diffs) < 2:
        return out
    v_seeds = float(np.var(diffs, ddof=1) / len(diffs))
    se = float(np.sqrt(v_seeds + v_examples))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1) * se)
    tail = stats.t(len(diffs) - 1)
    out.update(
        low=out["mean"] - half,
        high=out["mean"] + half,
        significant=bool(half > 0 and (out["mean"] - half > 0 or out["mean"] + half < 0)),
        no_spread=False,
        p=float(2 * tail.sf(abs(out["mean"]) / se)) if se > 0 else None,
    )
    return out


def accuracy(predictions, target) -> float:
    return float(np.mean(np.asarray(predictions) == np.asarray(target)))


def pearson(predictions, target) -> float:
    p, t = np.asarray(predictions, dtype=float), np.asarray(target, dtype=float)
    if p.std() == 0 or t.std() == 0:
        return float("nan")
    return float(np.corrcoef(p, t)[0, 1])


def holm(pvalues: dict) -> dict:
    """Holm's step-down adjustment within one family: name -> adjusted p (each at most 1, never below an earlier
    one in the ordering). None stays None (no test)."""
    tested = sorted(((p, name) for name, p in pvalues.items() if p is not None), key=lambda x: x[0])
    m, running, out = len(tested), 0.0, dict.fromkeys(pvalues)
    for rank, (p, name) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[name] = running
    return out
