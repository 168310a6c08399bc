"""The causal-LM half of ``mgpo train``: data preparation and evaluation by generation.

Benchmarks: ``math`` (exact match of the final number; the ``arithmetic`` test split offline, GSM8K online),
``humaneval`` (pass@1 in the sandbox), ``mtbench`` (two-turn answers, judged when a judge endpoint is
configured). ``auto`` picks by the prompt template: math -> math, otherwise none (name one explicitly).
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

from mgpo.pipelines.config import TrainConfig

MATH_STOP = ["\nQ:", "\n\n\n"]


def prepare_causal_lm(cfg: TrainConfig, tokenizer):
    from mgpo.data.instruct import CausalLMCollator, load_instruct_data, tokenize_for_causal_lm, with_eval_data

    d = cfg.data
    data = load_instruct_data(
        d.name,
        template=d.template,
        prompt_column=d.prompt_column,
        response_column=d.response_column,
        seed=d.seed,
        n_train=d.max_train_examples,
        n_test=d.max_eval_examples,
    )
    if d.eval_name is not None:
        data = with_eval_data(data, d.eval_name, seed=d.seed)
    train_ids, stats = tokenize_for_causal_lm(data.train, tokenizer, data.template, max_length=cfg.model.max_length)
    splits = {"train": train_ids}
    if data.validation is not None and len(data.validation):
        splits["validation"], _ = tokenize_for_causal_lm(
            data.validation, tokenizer, data.template, max_length=cfg.model.max_length
        )
    if stats.n_truncated or stats.n_dropped:
        print(
            f"mgpo: {stats.n_truncated} training examples truncated to {stats.max_length} tokens, "
            f"{stats.n_dropped} dropped (prompt alone too long)",
            flush=True,
        )
    info = {
        "train_examples": stats.n_examples,
        "truncated_examples": stats.n_truncated,
        "dropped_examples": stats.n_dropped,
        "mean_tokens": round(stats.mean_length, 1),
    }
    return data, splits, CausalLMCollator(tokenizer), info


def pick_benchmark(cfg: TrainConfig, data) -> str:
    bench = cfg.generation.benchmark
    if bench != "auto":
        return bench
    return "math" if data.test is not None and "answer" in data.test.column_names else "none"


def _sandbox_limits(cfg: TrainConfig):
    from mgpo.eval.sandbox import SandboxLimits

    return SandboxLimits(allow_visible_answers=cfg.generation.allow_visible_answers)


def _scorable(test) -> tuple[list, list]:
    """The test rows a math score can take (a gold answer that is a number), and the others."""
    from mgpo.eval.math import has_gold

    kept: list = []
    unread: list = []
    for row in test:  # one read of each row's gold
        (kept if has_gold(row) else unread).append(row)
    return kept, unread


def check_benchmark(cfg: TrainConfig, data, *, say: bool = True) -> None:
    """Before training: a math benchmark without a test split is refused, and ``auto`` says when data with final
    answers gets no score for want of one (it would otherwise train and end with no benchmark, without a word)."""
    t = cfg.training
    chooses = t.load_best_model or t.early_stopping_patience
    if data.test is not None and data.validation is data.test and chooses and pick_benchmark(cfg, data) != "none":
        warnings.warn(
            "causal-lm: the validation loss that training.load_best_model / early_stopping_patience choose by is "
            "taken on the test split, the rows the benchmark then scores, so its after_* score is an optimistic "
            "one. For an unbiased score, train without them (the last step is scored).",
            RuntimeWarning,
            stacklevel=2,
        )
    if data.test is not None and pick_benchmark(cfg, data) == "math":
        rows, unread = _scorable(data.test)
        if not rows:
            raise ValueError(
                f"generation.benchmark='math': none of the {len(unread)} test rows of {cfg.data.name!r} has a gold "
                "answer that is a number (after '####' or 'The answer is', else the last number of the response)."
            )
        if unread and say:
            example = str(unread[0].get("response") or unread[0].get("answer") or "")[-60:]
            print(
                f"mgpo: math: {len(unread)} of {len(rows) + len(unread)} test rows of {cfg.data.name!r} have no gold "
                f"answer that is a number (e.g. ...{example!r}); the math score leaves them out (after_no_gold), "
                "the validation loss keeps them.",
                flush=True,
            )
    if pick_benchmark(cfg, data) == "humaneval":
        from mgpo.eval.humaneval import answer_files
        from mgpo.eval.sandbox import answers_visible

        try:  # before training, not after it
            answers_visible(_sandbox_limits(cfg), answer_files())
        except RuntimeError as err:
            raise ValueError(
                f"generation.benchmark='humaneval': {err} In a config: generation.allow_visible_answers=true."
            ) from err
    if data.test is not None:
        return
    fix = "set data.max_eval_examples to hold that many rows out as the test split"
    if cfg.generation.benchmark == "math":
        raise ValueError(f"generation.benchmark='math' needs a test split, and data {cfg.data.name!r} has none: {fix}.")
    if say and cfg.generation.benchmark == "auto" and "answer" in data.train.column_names:
        print(
            f"mgpo: generation.benchmark=auto: {cfg.data.name!r} has final answers but no test split, so no math "
            f"score is taken; {fix}.",
            flush=True,
        )


def evaluate_generation(cfg: TrainConfig, model, tokenizer, data, out: Path, *, prefix: str) -> dict:
    """Run the configured benchmark; per-sample JSONL goes to ``out/<prefix>_<benchmark>.jsonl``."""
    from mgpo.eval.generate import chat_generate, generate

    g = cfg.generation
    bench = pick_benchmark(cfg, data)
    bars = cfg.training.progress and sys.stderr.isatty()  # tqdm bars in a file are one endless line
    if bench == "none":
        return {}
    gen = functools.partial(
        generate, model, tokenizer, max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, progress=bars
    )
    samples = Path(out) / f"{prefix}_{bench}.jsonl"
    if bench == "math":
        from mgpo.eval.math import evaluate_math

        if data.test is None:
            raise ValueError("math evaluation needs a test split: set data.max_eval_examples to carve one out")
        rows, unread = _scorable(data.test)  # check_benchmark said before training how many are left out
        rows = rows[: g.max_examples] if g.max_examples else rows
        result = evaluate_math(functools.partial(gen, stop=MATH_STOP), rows, data.template, samples, progress=bars)
        result["no_gold"] = len(unread)
        if prefix == "after":  # the trained model's answers, one row per problem: the report's examples-and-seeds
            from mgpo.pipelines import predictions  # interval reads them

            predictions.write_math(Path(out), samples)
    elif bench == "humaneval":
        from mgpo.eval import humaneval

        problems = humaneval.load_problems(limit=g.max_examples)
        sampling = dict(do_sample=True, temperature=g.temperature) if g.num_samples > 1 else {}
        result = humaneval.evaluate(
            functools.partial(gen, stop=list(humaneval.STOP_SEQUENCES), **sampling),
            problems,
            samples_per_problem=g.num_samples,
            k=sorted({1, g.num_samples}),
            out_jsonl=samples,
            progress=bars,
            limits=_sandbox_limits(cfg),
        )
        if result["answers_visible"]:
            print(
                f"mgpo: humaneval ({prefix}): graded where the programs could read HumanEval's answers (no "
                "bubblewrap; generation.allow_visible_answers=true): a completion that reads them passes",
                flush=True,
            )
    else:
        from mgpo.eval import mtbench

        questions = mtbench.load_questions()[: g.max_examples or None]

        def chat(messages):
            return chat_generate(model, tokenizer, [messages], max_new_tokens=g.max_new_tokens, progress=False)[0]

        answers = mtbench.generate_answers(chat, questions, progress=bars)
        judge = None
        if g.judge_url:
            judge = mtbench.JudgeConfig(url=g.judge_url, model=g.judge_model, api_key_env=g.judge_api_key_env)
        result = mtbench.judge(answers, judge, samples)
    result["samples"] = str(samples)
    cut = result.get("hit_max_new_tokens", result.get("num_hit_max_new_tokens", 0))
    if cut:
        total = result.get("total", result.get("num_samples"))
        scored = (
            "they count only where '####' or 'the answer is' came before the cut"
            if bench == "math"
            else "scored as written, maybe cut short"
        )
        print(
            f"mgpo: {bench} ({prefix}): {cut} of {total} outputs ran into generation.max_new_tokens="
            f"{g.max_new_tokens} before they ended ({scored}; see hit_max_new_tokens in {samples}); raise "
            "generation.max_new_tokens if that is too few",
            flush=True,
        )
    return {f"{prefix}_{k}": v for k, v in result.items() if not isinstance(v, (list, dict))}


def rescore_run(run: str | Path) -> dict[str, dict]:
    """Score a finished run's math answers again with today's rule (:func:`mgpo.eval.math.rescore`), from the
    per-sample files it kept (``before_math.jsonl``, ``after_math.jsonl``): their rows, the ``before_*`` /
    ``after_*`` keys of ``metrics.json`` and, after training, ``predictions.jsonl``. Returns each prefix's new
    result with the old accuracy (``was``). Refuses a run that kept no per-sample math file."""
    from mgpo.eval.math import rescore
    from mgpo.pipelines.checkpoints import read_json, write_json

    folder = Path(run)
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{folder} has no metrics.json: pass the folder of a finished mgpo train run")
    found = {prefix: folder / f"{prefix}_math.jsonl" for prefix in ("before", "after")}
    found = {k: v for k, v in found.items() if v.is_file()}
    if not found:
        raise FileNotFoundError(
            f"{folder} kept no before_math.jsonl or after_math.jsonl: only a math benchmark's per-sample answers can "
            "be scored again (run folders copied without them, like docs/experiments-clean/runs, cannot)"
        )
    metrics = read_json(metrics_path)
    for samples in found.values():
        rescore(samples, write=False)  # every file scores (or is refused) before any is rewritten
    done: dict[str, dict] = {}
    for prefix, samples in found.items():
        result = rescore(samples)  # metrics keep the samples' path as the run wrote it
        done[prefix] = {**result, "was": metrics.get(f"{prefix}_accuracy")}
        # golds_kept (golds that could not be read again) is for the caller to say, not a metric
        metrics.update({f"{prefix}_{k}": v for k, v in result.items() if k != "golds_kept"})
        if prefix == "after":
            from mgpo.pipelines import predictions

            predictions.write_math(folder, samples)
    write_json(metrics_path, metrics)
    return done
