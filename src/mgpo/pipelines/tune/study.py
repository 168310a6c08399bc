"""The Optuna study: its database, sampler and pruner, the trial budget, recovery after a kill, and the seed
re-runs."""

from __future__ import annotations

import warnings

from mgpo.pipelines.config import ConfigError
from mgpo.pipelines.tune.config import BASELINE, SEARCH, SEEDS, STUDY, Tune


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("mgpo tune needs Optuna: pip install 'mgpo[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(tune: Tune):
    """The study (created on first use) with its sampler and pruner; trial 0, LoRA, is queued when new."""
    optuna = _optuna()
    with warnings.catch_warnings():  # Optuna marks the heartbeat "experimental" (since 2.8): said once, in the docs
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            tune.storage,
            # SQLite's writers wait for each other's lock: 5 s by default, which workers under load (and each one's
            # heartbeat) can exceed, failing a trial with "database is locked"
            engine_kwargs={"connect_args": {"timeout": 60}} if tune.sqlite else None,
            heartbeat_interval=10,
            grace_period=60,
            # a worker that died (killed, node lost) leaves its trial running: once its heartbeat is 60 s old the
            # trial is failed and queued again with the same settings
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    c = tune.config
    sampler = optuna.samplers.TPESampler(seed=c.sampler_seed, n_startup_trials=max(3, c.trials // 3))
    pruner = {
        # never at a trial's first evaluation: there a small radius has not had its effect yet, and on tweets
        # every rho below 0.007 was pruned at step 25 of 100 for trailing the larger ones (docs/tune-tweets.md)
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=c.eval_steps + 1),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=c.eval_steps, max_resource=c.max_steps),
        "none": optuna.pruners.NopPruner,
    }[c.pruner]()
    study = optuna.create_study(
        storage=storage, study_name=STUDY, sampler=sampler, pruner=pruner, direction=tune.direction, load_if_exists=True
    )
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial({}, user_attrs={"arm": BASELINE, "phase": SEARCH, "seed": tune.seed})
    return study


def counts(study) -> dict[str, int]:
    """Search trials by state (LoRA's and seed re-runs not included)."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("phase", SEARCH) == SEARCH and t.user_attrs.get("arm") != BASELINE:
            out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def recover(study, left_running: bool = True) -> list[int]:
    """Queue again, with their settings, the trials a session's Ctrl-C interrupted and, with ``left_running`` (no
    worker of this study runs now), those a killed session left running, which are failed first. Returns the
    numbers queued again."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    again = []
    for t in trials:
        if t.state == TrialState.RUNNING and left_running:
            study.tell(t.number, state=TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")):
            continue
        if t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={**t.user_attrs, "interrupted": False, "retry_of": t.number})
            again.append(t.number)
    return again


def _next(study, budget: int) -> bool:
    """Whether a worker should take a trial: a queued one, or a new search trial while the budget allows."""
    from optuna.trial import TrialState

    if any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False)):
        return True
    n = counts(study)
    return sum(n.get(s, 0) for s in ("COMPLETE", "PRUNED", "RUNNING")) < budget


def queue_seeds(study, tune: Tune, seeds: int) -> int:
    """Queue the ``tune.top`` best search settings and LoRA with seeds 1 .. S-1 after the search's own (paired by
    seed); what an earlier session queued is not queued again. Returns how many were queued."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    search = [t for t in trials if t.user_attrs.get("phase", SEARCH) == SEARCH and t.state == TrialState.COMPLETE]
    baseline = [t for t in search if t.user_attrs.get("arm") == BASELINE]
    best: list = []  # optuna's FrozenTrials
    seen = set()
    for t in sorted(
        (t for t in search if t.user_attrs.get("arm") != BASELINE),
        key=lambda t: t.value,
        reverse=tune.direction == "maximize",
    ):
        key = tuple(sorted(t.params.items()))
        if key not in seen and len(best) < tune.config.top:
            seen.add(key)
            best.append(t)
    queued = {(t.user_attrs.get("of"), t.user_attrs.get("seed")) for t in trials if t.user_attrs.get("phase") == SEEDS}
    n = 0
    for t in baseline[:1] + best:
        for seed in range(tune.seed + 1, tune.seed + seeds):
            if (t.number, seed) not in queued:
                study.enqueue_trial(
                    {} if t.user_attrs.get("arm") == BASELINE else t.params,
                    user_attrs={"arm": t.user_attrs.get("arm"), "phase": SEEDS, "seed": seed, "of": t.number},
                )
                n += 1
    return n
