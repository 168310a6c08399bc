"""The double-descent measure, the instability count and the paired bootstrap on inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from mgpo.pipelines.measures import double_descent, instability_count, paired_t, smooth


def test_smooth_is_a_trailing_moving_average():
    assert smooth([2, 4, 6, 8], 2).tolist() == [2, 3, 5, 7]
    assert smooth([2, 4, 6], 5).tolist() == [2, 3, 4]
    assert smooth([1.5, 7.0], 1).tolist() == [1.5, 7.0]
    with pytest.raises(ValueError, match="window=0"):
        smooth([1, 2], 0)


def test_a_bump_after_convergence_is_measured_exactly():
    steps = list(range(10, 110, 10))
    losses = [5, 4, 3, 2, 1, 2, 3, 2, 1, 0.5]
    dd = double_descent(steps, losses, window=1)
    assert dd["rise"] == 2.0 and dd["rise_rel"] == 2.0  # back up to 3 from a minimum of 1
    assert dd["onset_step"] == 50 and dd["peak_step"] == 70  # minimum at step 50, peak at step 70
    assert dd["recover_steps"] == 20 and dd["recovered"]  # loss <= 1 again at step 90


def test_fall_says_whether_the_run_learned_at_all():
    assert double_descent(range(10), [5, 4, 3, 2, 1, 2, 3, 2, 1, 0.5], window=1)["fall_rel"] == pytest.approx(0.9)
    flat = double_descent(range(6), [0.7, 0.69, 0.71, 0.7, 0.72, 0.7], window=2)  # start = mean(0.7, 0.69)
    assert flat["fall_rel"] == pytest.approx(0.0)  # never below its starting level: it did not learn
    assert double_descent(range(4), [4, 2, 1, 1], window=2)["fall_rel"] == pytest.approx((3 - 1) / 3)


def test_the_smoothed_curve_is_measured_not_the_raw_one():
    # window 2: smoothed = [4, 3.5, 2.5, 2, 3, 3, 1.5] -> min 2 at index 3, peak 3 at index 4, back at index 6
    dd = double_descent(range(7), [4, 3, 2, 2, 4, 2, 1], window=2)
    assert dd["rise"] == pytest.approx(1.0) and dd["rise_rel"] == pytest.approx(0.5)
    assert (dd["onset_step"], dd["peak_step"], dd["recover_steps"]) == (3, 4, 2)


def test_a_monotone_curve_has_no_double_descent():
    dd = double_descent(range(50), np.linspace(3, 1, 50))
    assert dd["rise"] == 0 and dd["rise_rel"] == 0 and dd["peak_step"] is None and dd["recovered"]


def test_a_curve_that_never_comes_back_is_not_recovered():
    dd = double_descent([1, 2, 3, 4, 5], [3, 2, 1, 2, 2.5], window=1)
    assert dd["rise"] == 1.5 and dd["peak_step"] == 5 and dd["recover_steps"] is None and not dd["recovered"]


def test_the_largest_of_two_bumps_wins():
    losses = [4, 2, 2.5, 2, 1, 3, 1, 0.5]  # bumps of 0.5 (above 2) and 2.0 (above 1)
    dd = double_descent(range(8), losses, window=1)
    assert dd["rise"] == 2.0 and dd["peak_step"] == 5


def test_a_larger_divergence_measures_larger():
    t = np.arange(200)
    base = 2 * np.exp(-t / 30) + 0.5
    small, large = (base + h * np.exp(-(((t - 120) / 10) ** 2)) for h in (0.2, 0.8))
    assert double_descent(t, large)["rise"] > double_descent(t, small)["rise"] > 0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="equally long"):
        double_descent([1, 2], [1.0])


def test_instability_counts_spikes_above_k_times_the_running_median():
    losses = [1.0] * 10 + [2.0] + [1.0] * 5 + [1.4] + [1.0] * 3
    assert instability_count(losses, window=5, factor=1.5) == 1  # 2.0 > 1.5, 1.4 is not
    assert instability_count(losses, window=5, factor=1.3) == 2
    assert instability_count(np.linspace(3, 1, 40), window=5) == 0


def test_paired_t_interval():
    up = paired_t([1.1, 1.2, 1.3, 1.25], [1.0, 1.0, 1.1, 1.05])
    # differences 0.1, 0.2, 0.2, 0.2: mean 0.175, sd 0.05, t(0.975, 3 df) = 3.182446
    assert up["n"] == 4 and up["mean"] == pytest.approx(0.175) and up["significant"]
    assert up["low"] == pytest.approx(0.175 - 3.182446 * 0.05 / 2, abs=1e-6)
    assert up["high"] == pytest.approx(0.175 + 3.182446 * 0.05 / 2, abs=1e-6)
    mixed = paired_t([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0])
    assert mixed["mean"] == 0 and mixed["low"] < 0 < mixed["high"] and not mixed["significant"]
    single = paired_t([2.0], [1.0])
    assert single["mean"] == 1.0 and single["low"] is None and not single["significant"]
    same = paired_t([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])  # no spread: t is undefined, not a zero-width certainty
    assert same["no_spread"] and same["low"] == same["high"] == 0 and not same["significant"]
    assert not up["no_spread"]


def test_paired_t_interval_covers_the_true_difference_95_percent_of_the_time_at_5_seeds():
    """The reason it is not a bootstrap: at n = 5 a percentile bootstrap covers about 83%, not 95%."""
    rng = np.random.default_rng(0)
    trials = 4000
    covered = 0
    for _ in range(trials):
        d = rng.normal(0.3, 1.0, size=5)
        got = paired_t(d, np.zeros(5))
        covered += got["low"] <= 0.3 <= got["high"]
    assert 0.935 < covered / trials < 0.965


def test_holm_adjusts_within_a_family_in_step_down_order():
    from mgpo.pipelines.measures import holm

    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "untested": None})
    assert adjusted["untested"] is None
    assert adjusted["a"] == pytest.approx(0.03) and adjusted["b"] == adjusted["c"] == pytest.approx(0.06)
    assert holm({"x": 0.6, "y": 0.9}) == {"x": 1.0, "y": 1.0}


def test_second_descent_needs_a_rise_and_then_a_fall():
    from mgpo.pipelines.measures import second_descent

    steps = list(range(12))
    falls = [10, 8, 6, 5, 4, 3.5, 3, 2.8, 2.6, 2.5, 2.4, 2.3]
    rise_fall = [10, 8, 6, 5, 4, 6, 8, 6, 4, 3, 2.5, 2]  # down to 4, up to 8, down to 2: a second descent
    diverges = [10, 8, 6, 5, 4, 6, 8, 10, 12, 14, 16, 18]  # up and never down again
    assert second_descent(steps, falls, 1)["second_descent_rel"] == 0
    dd = second_descent(steps, rise_fall, 1)
    assert dd["second_descent_rel"] == pytest.approx(1.0) and dd["second_peak_step"] == 6  # min(8-4, 8-2) / 4
    assert second_descent(steps, diverges, 1)["second_descent_rel"] == 0
    from mgpo.pipelines.measures import double_descent

    assert double_descent(steps, diverges, 1)["rise_rel"] > 3  # the bump measure counts a divergence in full


def test_an_interval_over_examples_and_seeds_is_wider_than_over_seeds_and_sees_a_real_difference():
    from mgpo.pipelines.measures import accuracy, paired_over_examples_and_seeds

    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, 300)

    def arm(p_right, seed):
        right = np.random.default_rng(seed).random(300) < p_right
        return np.where(right, target, 1 - target)

    same = paired_over_examples_and_seeds(
        {s: arm(0.8, s) for s in range(5)}, {s: arm(0.8, 10 + s) for s in range(5)}, target, accuracy, boots=300
    )
    assert same["low"] < 0 < same["high"] and not same["significant"]
    assert same["high"] - same["low"] > same["seeds_high"] - same["seeds_low"]  # the examples add variance
    better = paired_over_examples_and_seeds(
        {s: arm(0.9, s) for s in range(5)}, {s: arm(0.7, 10 + s) for s in range(5)}, target, accuracy, boots=300
    )
    assert better["significant"] and better["low"] > 0 and better["p"] < 0.01 and better["examples"] == 300
    # one seed (a partial sweep): a clear difference over the examples, but the training noise is unmeasured, so
    # there is no interval and no p; the examples-only interval is kept apart, and is as narrow as it looks
    one = paired_over_examples_and_seeds({0: arm(0.9, 0)}, {0: arm(0.7, 10)}, target, accuracy, boots=300)
    assert (one["low"], one["high"], one["p"], one["significant"]) == (None, None, None, False)
    assert 0 < one["examples_low"] < one["mean"] < one["examples_high"] and one["n"] == 1
