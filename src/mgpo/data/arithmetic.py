"""Built-in offline dataset ``arithmetic``: generated GSM8K-style multi-step word problems.

Every problem is a short story whose quantity changes step by step (add, subtract, multiply,
divide). The worked solution writes one equation per step and ends with ``#### <answer>``,
the GSM8K convention, so the same answer extraction works for both.

Guarantees:

* deterministic from ``seed`` (and the other arguments);
* every number in a problem (operands, intermediate results, answer) is a positive integer
  no larger than ``max_number``; divisions are exact;
* the test split is drawn from its own random stream, so it depends on ``seed`` and ``n_test``
  but not on ``n_train``; train problems whose question text appears in test are skipped,
  so the splits never overlap (see :func:`find_overlap` / :func:`check_no_overlap`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import datasets

__all__ = [
    "TEMPLATES",
    "Problem",
    "Template",
    "check_no_overlap",
    "find_overlap",
    "make_arithmetic",
    "sample_problem",
]

NAMES = (
    "Ava",
    "Ben",
    "Cleo",
    "Dan",
    "Emma",
    "Finn",
    "Gia",
    "Hugo",
    "Ivy",
    "Jack",
    "Kim",
    "Leo",
    "Mia",
    "Noah",
    "Olga",
    "Paul",
    "Rosa",
    "Sam",
    "Tara",
    "Omar",
    "Yuki",
    "Zoe",
    "Ravi",
    "Lena",
)

SYMBOLS = {"+": "+", "-": "-", "*": "*", "/": "/"}


@dataclass(frozen=True)
class Template:
    """One family of word problems.

    Sentences are ``str.format`` strings. Fields available everywhere: ``{name}`` (the main
    character), ``{n}`` (the operand of the step), ``{prev}`` / ``{new}`` (people in the ``ages``
    template) and every key of ``words`` (one value drawn per problem).
    """

    name: str
    start: tuple[str, ...]  # opening sentences; use {n}, or {a} and {b} when start_product
    question: str  # asked when the last step keeps the subject of the story
    ops: dict[str, tuple[str, ...]]  # op symbol -> sentences usable at any step
    final_ops: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    # op -> (sentence, question) pairs that change what is asked, so only allowed as the last step
    words: dict[str, tuple[str, ...]] = field(default_factory=dict)
    start_product: bool = False  # the opening sentence is itself a step: a * b
    new_person_each_step: bool = False  # ages: every step introduces another person


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            name="collecting",
            start=("{name} has {n} {obj}.", "{name} owns {n} {obj}."),
            question="How many {obj} does {name} have now?",
            ops={
                "+": ("{name} finds {n} more {obj}.", "A friend gives {name} {n} {obj}."),
                "-": ("{name} gives away {n} {obj}.", "{name} loses {n} {obj}."),
                "*": ("{name}'s collection grows to {n} times its size.",),
                "/": ("{name} splits the {obj} into {n} equal piles and keeps one pile.",),
            },
            words={"obj": ("marbles", "stickers", "shells", "stamps", "cards", "beads", "rocks")},
        ),
        Template(
            name="savings",
            start=("{name} has ${n}.", "{name} has saved ${n}."),
            question="How many dollars does {name} have now?",
            ops={
                "+": ("{name} earns ${n} by {job}.", "{name} gets ${n} as a gift."),
                "-": ("{name} buys a {item} for ${n}.", "{name} spends ${n} on a {item}."),
                "*": ("{name}'s money grows to {n} times as much.",),
            },
            final_ops={
                "/": (
                    ("{name} splits the money equally into {n} envelopes.", "How many dollars go in each envelope?"),
                ),
            },
            words={
                "job": ("washing cars", "walking dogs", "selling lemonade", "mowing lawns"),
                "item": ("book", "toy", "hat", "ball", "kite", "game"),
            },
        ),
        Template(
            name="shopping",
            start=("{name} buys {a} {item} that cost ${b} each.",),
            question="How many dollars does {name} pay in total?",
            ops={
                "+": ("{name} also pays ${n} for {extra}.",),
                "-": ("{name} uses a coupon for ${n} off.", "The shop gives {name} ${n} back."),
            },
            final_ops={
                "/": (
                    (
                        "{name} shares the cost equally with friends, {n} people in all.",
                        "How many dollars does each person pay?",
                    ),
                ),
            },
            words={
                "item": ("pens", "apples", "notebooks", "cookies", "tickets", "candles"),
                "extra": ("a bag", "delivery", "gift wrap"),
            },
            start_product=True,
        ),
        Template(
            name="sharing",
            start=("A {box} holds {n} {food}.", "There are {n} {food} in a {box}."),
            question="How many {food} are in the {box} now?",
            ops={
                "+": ("{name} puts {n} more {food} in the {box}.",),
                "-": ("{name} eats {n} {food}.", "{name} gives {n} {food} to a neighbor."),
                "*": ("{name} fills it up until there are {n} times as many {food}.",),
            },
            final_ops={
                "/": (("The {food} are shared equally among {n} children.", "How many {food} does each child get?"),),
            },
            words={
                "box": ("basket", "jar", "box", "bowl"),
                "food": ("apples", "cookies", "grapes", "candies", "plums", "nuts"),
            },
        ),
        Template(
            name="rates",
            start=(
                "A {place} makes {a} {obj} every hour for {b} hours.",
                "A {place} makes {a} {obj} each hour. It works for {b} hours.",
            ),
            question="How many {obj} does the {place} have now?",
            ops={
                "+": ("Later it makes {n} more {obj}.",),
                "-": ("{n} {obj} are sold.", "{n} {obj} are broken and thrown away."),
            },
            final_ops={
                "/": (("The {obj} are packed into boxes of {n}.", "How many boxes are filled?"),),
            },
            words={
                "place": ("bakery", "factory", "workshop"),
                "obj": ("cakes", "toys", "chairs", "cups", "pies"),
            },
            start_product=True,
        ),
        Template(
            name="ages",
            start=("{name} is {n} years old.",),
            question="How old is {last}?",
            ops={
                "+": ("{new} is {n} years older than {prev}.",),
                "-": ("{new} is {n} years younger than {prev}.",),
                "*": ("{new} is {n} times as old as {prev}.",),
                "/": ("{prev} is {n} times as old as {new}.",),
            },
            new_person_each_step=True,
        ),
        Template(
            name="garden",
            start=("{name} plants {a} rows of {b} {plant}.",),
            question="How many {plant} are in the garden now?",
            ops={
                "+": ("{name} plants {n} more {plant}.",),
                "-": ("Rabbits eat {n} of the {plant}.", "{n} {plant} do not grow."),
            },
            final_ops={
                "/": (
                    (
                        "{name} gives all the {plant} equally to {n} neighbors.",
                        "How many {plant} does each neighbor get?",
                    ),
                ),
            },
            words={"plant": ("carrots", "tulips", "beans", "onions", "roses")},
            start_product=True,
        ),
    )
}


@dataclass
class Problem:
    """One generated problem, with the structure needed to recompute its answer."""

    template: str
    start: int  # the value after the opening sentence
    steps: list[tuple[str, int]]  # (op, operand); for start_product the first is ("*", b)
    question: str
    solution: str
    answer: int


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a // b
    raise ValueError(f"unknown op {op!r}")


def _operand_choices(op: str, value: int, max_number: int) -> list[int]:
    """Operands that keep the result a positive integer <= max_number (and small factors)."""
    if op == "+":
        return list(range(1, max_number - value + 1))
    if op == "-":
        return list(range(1, value))
    if op == "*":
        return list(range(2, min(10, max_number // value) + 1))
    if op == "/":
        return [k for k in range(2, min(10, value) + 1) if value % k == 0]
    raise ValueError(f"unknown op {op!r}")


def sample_problem(rng: random.Random, template: Template, n_steps: int, max_number: int) -> Problem:
    """Draw one problem with exactly ``n_steps`` solution equations from ``template``."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    words = {key: rng.choice(values) for key, values in template.words.items()}
    people = rng.sample(NAMES, n_steps + 1)
    ctx = dict(words, name=people[0])
    sentences: list[str] = []
    lines: list[str] = []
    steps: list[tuple[str, int]] = []

    if template.start_product:
        # a * b <= max_number with both factors >= 2
        pairs = [(a, b) for a in range(2, max_number // 2 + 1) for b in range(2, max_number // a + 1)]
        if not pairs:
            raise ValueError(f"max_number={max_number} is too small for template {template.name!r}; use >= 4")
        a, b = rng.choice(pairs)
        value = a * b
        sentences.append(rng.choice(template.start).format(a=a, b=b, **ctx))
        lines.append(f"{a} * {b} = {value}")
        steps.append(("*", b))
        start = a
        remaining = n_steps - 1
    else:
        value = rng.randint(2, max_number)
        sentences.append(rng.choice(template.start).format(n=value, **ctx))
        start = value
        remaining = n_steps

    question = template.question
    subject = people[0]
    for i in range(remaining):
        last = i == remaining - 1
        options: list[tuple[str, str, str | None]] = [
            (op, s, None) for op, texts in template.ops.items() for s in texts
        ]
        if last:
            options += [(op, s, q) for op, pairs in template.final_ops.items() for s, q in pairs]
        options = [o for o in options if _operand_choices(o[0], value, max_number)]
        # group by op first so that ops with many phrasings are not favoured
        op = rng.choice(sorted({o[0] for o in options}))
        _, sentence, new_question = rng.choice([o for o in options if o[0] == op])
        n = rng.choice(_operand_choices(op, value, max_number))
        new_value = _apply(op, value, n)
        if template.new_person_each_step:
            prev, subject = subject, people[i + 1]
            sentence = sentence.format(n=n, prev=prev, new=subject, **ctx)
        else:
            sentence = sentence.format(n=n, **ctx)
        sentences.append(sentence)
        lines.append(f"{value} {SYMBOLS[op]} {n} = {new_value}")
        steps.append((op, n))
        value = new_value
        if new_question is not None:
            question = new_question

    sentences.append(question.format(last=subject, **ctx))
    solution = "\n".join(lines + [f"#### {value}"])
    return Problem(template.name, start, steps, " ".join(sentences), solution, value)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def find_overlap(splits: datasets.DatasetDict | dict, column: str = "prompt") -> list[str]:
    """Questions (normalised: lower case, single spaces) that occur in both ``train`` and ``test``."""
    for split in ("train", "test"):
        if split not in splits:
            raise KeyError(f"find_overlap needs a 'train' and a 'test' split; got {list(splits)}")
        if column not in splits[split].column_names:
            raise KeyError(f"column {column!r} not in the {split} split; columns: {splits[split].column_names}")
    train = {_normalise(q) for q in splits["train"][column]}
    return sorted({_normalise(q) for q in splits["test"][column]} & train)


def check_no_overlap(splits: datasets.DatasetDict | dict, column: str = "prompt") -> None:
    """Raise ``ValueError`` if any test question also appears in train."""
    overlap = find_overlap(splits, column)
    if overlap:
        raise ValueError(
            f"{len(overlap)} test questions also appear in train, e.g. {overlap[0]!r}; "
            "regenerate the data or dedupe the splits"
        )


def _draw(
    rng: random.Random,
    count: int,
    names: list[str],
    min_steps: int,
    max_steps: int,
    max_number: int,
    exclude: set[str],
) -> list[Problem]:
    problems: list[Problem] = []
    seen = set(exclude)
    misses = 0  # duplicates drawn in a row; many means the problem space is used up
    while len(problems) < count:
        if misses > 2000:
            raise ValueError(
                f"could only generate {len(problems)} distinct problems out of {count} requested "
                f"(max_number={max_number}, steps {min_steps}..{max_steps}, templates {names}); "
                "ask for fewer problems, or raise max_number / max_steps, or use more templates"
            )
        template = TEMPLATES[rng.choice(names)]
        problem = sample_problem(rng, template, rng.randint(min_steps, max_steps), max_number)
        key = _normalise(problem.question)
        if key in seen:
            misses += 1
            continue
        misses = 0
        seen.add(key)
        problems.append(problem)
    return problems


def _to_dataset(problems: list[Problem]) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "prompt": [p.question for p in problems],
            "response": [p.solution for p in problems],
            "answer": [str(p.answer) for p in problems],
        }
    )


def make_arithmetic(
    n_train: int = 2000,
    n_test: int = 200,
    seed: int = 0,
    min_steps: int = 1,
    max_steps: int = 3,
    max_number: int = 50,
    templates: list[str] | tuple[str, ...] | None = None,
) -> datasets.DatasetDict:
    """Generate the ``arithmetic`` dataset: columns ``prompt``, ``response`` (ends with ``#### N``), ``answer``.

    Args:
        n_train: number of training problems.
        n_test: number of test problems (never overlapping train).
        seed: random seed; the same arguments always give the same data.
        min_steps: fewest solution equations per problem (>= 1).
        max_steps: most solution equations per problem.
        max_number: every operand, intermediate result and answer is in 1..max_number.
        templates: subset of :data:`TEMPLATES` names to use (default: all).
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got n_train={n_train}, n_test={n_test}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
    if max_number < 4:
        raise ValueError(f"max_number must be >= 4, got {max_number}")
    names = list(TEMPLATES) if templates is None else list(templates)
    unknown = [t for t in names if t not in TEMPLATES]
    if unknown or not names:
        raise ValueError(f"unknown or empty templates {unknown or names}; choose from {sorted(TEMPLATES)}")

    test = _draw(random.Random(f"arithmetic-test-{seed}"), n_test, names, min_steps, max_steps, max_number, set())
    test_keys = {_normalise(p.question) for p in test}
    train = _draw(
        random.Random(f"arithmetic-train-{seed}"), n_train, names, min_steps, max_steps, max_number, test_keys
    )
    splits = datasets.DatasetDict(train=_to_dataset(train), test=_to_dataset(test))
    check_no_overlap(splits)
    return splits
