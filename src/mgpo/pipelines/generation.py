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

BENCHMARKS = ("auto", "none", "math", "humaneval", "mtbench")
MATH_STOP = ["\nQ:", "\n\n\n"]


def prepare_causal_lm(cfg: TrainConfig, tokenizer):
    from mgpo.data.instruct import CausalLMCollator, load_instruct_data, tokenize_for_causal_lm

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
    train_ids, stats = tokenize_for_causal_lm(data.train, tokenizer, data.template, max_length=cfg.model.max_length)
    splits = {"train": train_ids}
    if data.test is not None and len(data.test):
        splits["validation"], _ = tokenize_for_causal_lm(
            data.test, tokenizer, data.template, max_length=cfg.model.max_length
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


def check_benchmark(cfg: TrainConfig, data, *, say: bool = True) -> None:
    """Before training: a math benchmark without a test split is refused, and ``auto`` says when data with final
    answers gets no score for want of one (it would otherwise train and end with no benchmark, without a word)."""
    t = cfg.training
    chooses = t.load_best_model or t.early_stopping_patience
    if data.test is not None and chooses and pick_benchmark(cfg, data) != "none":
        warnings.warn(
            "causal-lm: the validation loss that training.load_best_model / early_stopping_patience choose by is "
            "taken on the test split, the rows the benchmark then scores, so its after_* score is an optimistic "
            "one. For an unbiased score, train without them (the last step is scored).",
            RuntimeWarning,
            stacklevel=2,
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
        rows = list(data.test)[: g.max_examples] if g.max_examples else list(data.test)
        result = evaluate_math(functools.partial(gen, stop=MATH_STOP), rows, data.template, samples, progress=bars)
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
        print(
            f"mgpo: {bench} ({prefix}): {cut} of {total} outputs ran into generation.max_new_tokens="
            f"{g.max_new_tokens} before they ended (scored as written, maybe cut short; see "
            f"hit_max_new_tokens in {samples}); raise generation.max_new_tokens if that is too few",
            flush=True,
        )
    return {f"{prefix}_{k}": v for k, v in result.items() if not isinstance(v, (list, dict))}
