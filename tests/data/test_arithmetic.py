import random
import re

import datasets
import pytest

from mgpo.data.arithmetic import (
    NAMES,
    TEMPLATES,
    check_no_overlap,
    find_overlap,
    make_arithmetic,
    sample_problem,
)
from mgpo.eval.math import extract_answer

LINE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


def _compute(a, op, b):
    return {"+": a + b, "-": a - b, "*": a * b}.get(op) if op != "/" else (a // b if a % b == 0 else None)


def test_deterministic_from_seed():
    a = make_arithmetic(n_train=50, n_test=20, seed=3)
    b = make_arithmetic(n_train=50, n_test=20, seed=3)
    c = make_arithmetic(n_train=50, n_test=20, seed=4)
    for split in ("train", "test"):
        assert a[split].to_dict() == b[split].to_dict()
    assert a["train"]["prompt"] != c["train"]["prompt"]


def test_columns_sizes_and_test_split_independent_of_n_train():
    small = make_arithmetic(n_train=10, n_test=15, seed=1)
    big = make_arithmetic(n_train=120, n_test=15, seed=1)
    assert isinstance(small, datasets.DatasetDict)
    assert small["train"].column_names == ["prompt", "response", "answer"]
    assert (len(small["train"]), len(small["test"])) == (10, 15)
    assert small["test"]["prompt"] == big["test"]["prompt"]


@pytest.mark.parametrize("max_number,max_steps", [(50, 3), (12, 4)])
def test_worked_solutions_are_correct_and_bounded(max_number, max_steps):
    data = make_arithmetic(n_train=300, n_test=50, seed=0, max_steps=max_steps, max_number=max_number)
    for row in list(data["train"]) + list(data["test"]):
        *lines, final = row["response"].split("\n")
        assert 1 <= len(lines) <= max_steps
        assert final == f"#### {row['answer']}"
        previous = None
        for line in lines:
            match = LINE.match(line)
            assert match, line
            a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
            assert _compute(a, op, b) == c, line
            assert previous is None or a == previous, row["response"]
            assert all(1 <= x <= max_number for x in (a, b, c)), line
            # every operand is stated in the question
            assert re.search(rf"(?<!\d){b}(?!\d)", row["prompt"]), (b, row["prompt"])
            previous = c
        assert str(previous) == row["answer"]
        assert extract_answer(row["response"]) == row["answer"]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_problem_structure_recomputes_answer(name):
    rng = random.Random(name)
    for _ in range(40):
        steps = rng.randint(1, 4)
        problem = sample_problem(rng, TEMPLATES[name], steps, 40)
        assert len(problem.steps) == steps
        value = problem.start
        for op, n in problem.steps:
            value = _compute(value, op, n)
            assert value is not None and 1 <= value <= 40
        assert value == problem.answer
        assert problem.question.endswith("?")
        assert "{" not in problem.question  # every placeholder filled


def test_no_train_test_overlap_and_check_function():
    data = make_arithmetic(n_train=400, n_test=100, seed=2, max_steps=1, max_number=20)
    assert find_overlap(data) == []
    check_no_overlap(data)
    leaked = datasets.DatasetDict(
        train=data["train"], test=datasets.concatenate_datasets([data["test"], data["train"].select([0])])
    )
    assert find_overlap(leaked) == [" ".join(data["train"][0]["prompt"].lower().split())]
    with pytest.raises(ValueError, match="also appear in train"):
        check_no_overlap(leaked)


def test_questions_are_unique_within_splits():
    data = make_arithmetic(n_train=300, n_test=60, seed=5)
    for split in ("train", "test"):
        assert len(set(data[split]["prompt"])) == len(data[split])


def test_step_range_and_template_subset():
    data = make_arithmetic(n_train=60, n_test=10, min_steps=2, max_steps=2, templates=["ages"])
    for row in data["train"]:
        assert row["response"].count("\n") == 2
        first, second, third, question = row["prompt"].split(". ")
        asked = question.removeprefix("How old is ").removesuffix("?")
        assert first.split()[0] in NAMES and asked in NAMES
        # the person asked about is introduced in the last sentence, the others earlier
        assert re.search(rf"\b{asked}\b", third) and not re.search(rf"\b{asked}\b", first + " " + second)


def test_all_templates_are_used_by_default():
    data = make_arithmetic(n_train=300, n_test=0, seed=0)
    starts = {"has", "owns", "holds", "plants", "buys", "makes", "There", "is"}
    assert len(data["test"]) == 0
    words = {w for p in data["train"]["prompt"] for w in p.split()[:4]}
    assert starts <= words


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown or empty templates"):
        make_arithmetic(n_train=5, n_test=5, templates=["poetry"])
    with pytest.raises(ValueError, match="min_steps"):
        make_arithmetic(n_train=5, n_test=5, min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="max_number"):
        make_arithmetic(n_train=5, n_test=5, max_number=2)
    with pytest.raises(ValueError, match="distinct problems"):
        # ages with one step and numbers <= 4 has only a handful of distinct questions per name pair
        make_arithmetic(n_train=20000, n_test=10, templates=["ages"], max_steps=1, max_number=4)
