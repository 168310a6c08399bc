import itertools
import json
import math

import pytest

from mgpo.eval.generate import Completion
from mgpo.eval.humaneval import (
    build_program,
    build_prompt,
    build_tests,
    check,
    evaluate,
    extract_completion,
    load_problems,
    pass_at_k,
)
from mgpo.eval.sandbox import SandboxLimits, judge_many

LIMITS = SandboxLimits(timeout_s=10, cpu_s=5, memory_mb=512, max_processes=4)


@pytest.fixture(scope="module")
def problems():
    return load_problems(limit=6)


def test_load_problems():
    everything = load_problems()
    assert len(everything) == 164
    assert everything[0]["task_id"] == "HumanEval/0"
    assert everything[163]["task_id"] == "HumanEval/163"
    assert [p["task_id"] for p in load_problems(limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    with pytest.raises(ValueError, match="limit=0"):
        load_problems(limit=0)


def test_prompt_is_signature_and_docstring(problems):
    for problem in problems:
        prompt = build_prompt(problem)
        assert f"def {problem['entry_point']}(" in prompt
        assert '"""' in prompt or "'''" in prompt
        assert "check(" not in prompt


def test_canonical_solutions_pass(problems):
    for problem in problems:
        result = check(problem, problem["canonical_solution"], LIMITS)
        assert result.passed, (problem["task_id"], result.detail)


def test_all_164_canonical_solutions_pass_in_the_default_sandbox():
    """The reference solutions must pass the judge with the default isolation (bubblewrap on CI), two at a time."""
    everything = load_problems()
    jobs = [(build_program(p, p["canonical_solution"]), p["entry_point"], build_tests(p)) for p in everything]
    results = judge_many(jobs, SandboxLimits(), workers=2)
    failed = [(p["task_id"], r.status, r.detail[-300:]) for p, r in zip(everything, results) if not r.passed]
    assert failed == []


def test_wrong_solutions_fail(problems):
    problem = problems[0]
    indent = "    "
    wrong = check(problem, f"{indent}return not any(True for _ in [])\n", LIMITS)  # always False
    assert not wrong.passed and wrong.status == "failed"
    crash = check(problem, f"{indent}return numbers[10**9]\n", LIMITS)
    assert not crash.passed and crash.status == "error"
    empty = check(problem, "", LIMITS)  # the docstring-only body returns None
    assert not empty.passed


def test_a_solution_that_exits_early_fails(problems):
    problem = problems[0]
    result = check(problem, "    import sys\n    sys.exit(0)\n", LIMITS)
    assert not result.passed and result.status == "failed"


def test_program_layout(problems):
    problem = problems[0]
    program = build_program(problem, "    return True\n")
    assert program.startswith(problem["prompt"] + "    return True\n")
    assert problem["test"] not in program and "check(" not in program  # the tests never enter the sandbox
    tests = build_tests(problem)
    assert tests.startswith(problem["prompt"]) and problem["test"] in tests
    assert tests.rstrip().endswith(f"{problem['entry_point']} = candidate\ncheck(candidate)")


def _brute_force_pass_at_k(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    value = pass_at_k(2000, 3, 100)
    exact = 1 - math.comb(1997, 100) / math.comb(2000, 100)
    assert value == pytest.approx(exact, rel=1e-9)
    assert pass_at_k(200, 0, 10) == 0.0
    assert pass_at_k(200, 200, 1) == 1.0
    assert pass_at_k(10, 5, 1) == pytest.approx(0.5)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 5)


PROBLEM = {
    "task_id": "Toy/0",
    "prompt": 'def add(a, b):\n    """Add two numbers."""\n',
    "entry_point": "add",
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
}


@pytest.mark.parametrize(
    "generated, expected",
    [
        ("    return a + b\n", "    return a + b\n"),
        ("    return a + b\n\ndef other():\n    pass\n", "    return a + b\n"),
        ("    return a + b\n\n\nif __name__ == '__main__':\n    print(add(1, 2))\n", "    return a + b\n"),
        ("    return a + b\nprint(add(1, 2))\n", "    return a + b\n"),
        ("    return a + b\n# Example usage\n", "    return a + b\n"),
        ("    return a + b\nclass Foo:\n    pass\n", "    return a + b\n"),
        ("    # add them\n    return a + b\n", "    # add them\n    return a + b\n"),
        ("```python\n    return a + b\n```\nThis adds the numbers.", "    return a + b\n"),
        ("    return a + b\n```\nExplanation", "    return a + b\n"),
    ],
)
def test_extract_completion_continuations(generated, expected):
    assert extract_completion(PROBLEM, generated) == expected


def test_extract_completion_repeated_signature_and_fences():
    echoed = (
        'Here is the code:\n```python\nimport math\n\ndef add(a, b):\n    """Add."""\n'
        "    return a + b\n\ndef unused():\n    pass\n\nprint(add(1, 2))\n```\nDone."
    )
    completion = extract_completion(PROBLEM, echoed)
    assert completion == 'import math\n\ndef add(a, b):\n    """Add."""\n    return a + b\n'
    # repeated signature without a fence, followed by test code
    plain = "def add(a, b):\n    return a + b\n\nassert add(1, 1) == 2\n"
    assert extract_completion(PROBLEM, plain) == "def add(a, b):\n    return a + b\n"
    for generated in (echoed, plain, "    return a + b\n"):
        assert check(PROBLEM, extract_completion(PROBLEM, generated), LIMITS).passed


def test_extract_completion_rejects_non_text():
    with pytest.raises(TypeError, match="str"):
        extract_completion(PROBLEM, None)


def test_evaluate_with_canonical_generations(tmp_path, problems):
    chosen = problems[:3]
    by_prompt = {p["prompt"]: p["canonical_solution"] for p in chosen}
    calls = []

    def generate(prompts):
        calls.append(len(prompts))
        return [by_prompt[p] for p in prompts]

    out = tmp_path / "out" / "humaneval.jsonl"
    metrics = evaluate(generate, chosen, out_jsonl=out, limits=LIMITS, progress=False, batch_size=2)
    assert metrics["pass@1"] == 1.0
    assert metrics["num_problems"] == 3 and metrics["num_samples"] == 3
    assert calls == [2, 1]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [p["task_id"] for p in chosen]
    for row, problem in zip(rows, chosen):
        assert row["prompt"] == problem["prompt"]
        assert row["raw_output"] == problem["canonical_solution"]
        assert row["passed"] is True and row["status"] == "passed"
        assert set(row) >= {"task_id", "prompt", "raw_output", "completion", "status", "passed"}


def test_evaluate_pass_at_k_with_mixed_samples(tmp_path, problems):
    chosen = problems[:2]
    solutions = {p["prompt"]: p["canonical_solution"] for p in chosen}
    seen = {}

    def generate(prompts):
        out = []
        for p in prompts:  # the first problem: 1 of 3 samples right; the second: all wrong
            seen[p] = seen.get(p, 0) + 1
            right = p == chosen[0]["prompt"] and seen[p] == 1
            # the second problem's samples ran into max_new_tokens (mgpo.eval.generate.Completion says so)
            out.append(
                solutions[p] if right else Completion.of("    raise NotImplementedError\n", p == chosen[1]["prompt"])
            )
        return out

    out = tmp_path / "samples.jsonl"
    metrics = evaluate(generate, chosen, samples_per_problem=3, k=(1, 2), limits=LIMITS, progress=False, out_jsonl=out)
    assert metrics["pass@1"] == pytest.approx((pass_at_k(3, 1, 1) + 0.0) / 2)
    assert metrics["pass@2"] == pytest.approx((pass_at_k(3, 1, 2) + 0.0) / 2)
    assert metrics["status_counts"] == {"passed": 1, "error": 5}
    assert metrics["num_hit_max_new_tokens"] == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["hit_max_new_tokens"] for r in rows] == [False] * 3 + [True] * 3


def test_evaluate_rejects_bad_input(problems):
    with pytest.raises(ValueError, match="k=\\[5\\]"):
        evaluate(lambda ps: ps, problems[:1], k=(5,), progress=False)
    with pytest.raises(ValueError, match="one str per prompt"):
        evaluate(lambda ps: [], problems[:1], progress=False)
