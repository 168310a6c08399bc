import json

import pytest

from mgpo.eval.math import evaluate_math, extract_answer, is_correct, normalize_number


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3 * 4 = 12\n12 - 5 = 7\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("She pays $5 in total.", "5"),
        ("The answer is 5.0", "5"),
        ("The answer is 7.", "7"),
        ("It costs $1,234.50 now", "1234.5"),
        ("#### 12\nQ: Tom has 5 apples", "12"),  # the #### line wins over later numbers
        ("10-3=7", "7"),
        ("10 - 13 = -3", "-3"),
        ("The balance is -$5.", "-5"),  # was 5: the sign before a dollar sign was lost
        ("it changed by -$1,250.50", "-1250.5"),
        ("The answer is: 18", "18"),
        ("1, 2, 3", "3"),  # a list, not a thousands group
        ("no digits here", None),
        ("", None),
        (None, None),
        ("#### \nso 42", "42"),  # empty #### line: fall back to the last number
        ("#### 12\n\nQuestion: Tom has 40. #### 40", "12"),  # was 40: the last ####, from a problem it made up
        ("The answer is 12.\nQuestion: Tom has 40 pears.", "12"),  # was 40: the marked answer, not the last number
        ("#### 7/2", "3.5"),  # was 7 (a pass for a gold 7): a fraction is one number
        ("#### 1/3", "1/3"),
        ("so 1e3 of them", "1000"),  # was 3
        ("#### \u22125", "-5"),  # was 5: the Unicode minus
        ("The answer is: \\frac{1}{2}", None),  # was 2: a marked answer that is not a number is none we can read
        ("The answer is **42**", "42"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_an_output_cut_off_by_max_new_tokens_counts_only_with_a_marked_answer():
    """Its last number is a half-written step: "44 + 4 = 4" (48 cut to 4) was a pass for a gold 4."""
    assert extract_answer("40 + 4 = 44\n44 + 4 = 4", complete=False) is None
    assert extract_answer("40 + 4 = 44\n44 + 4 = 4") == "4"  # the same text, ended by the model itself
    assert extract_answer("4 + 4 = 8\n#### 8\nQ: Sam has 3 and", complete=False) == "8"


def test_normalize_number():
    assert normalize_number("$2,000.00") == "2000"
    assert normalize_number("0.250") == "0.25"
    assert normalize_number("abc") is None


@pytest.mark.parametrize(
    "pred,gold,ok",
    [
        ("5.0", "5", True),
        ("1,000", "1000", True),
        ("$12", "12", True),
        (12, "12", True),
        ("0.5", "0.50", True),
        ("6", "5", False),
        (None, "5", False),
        ("5", None, False),
        ("x", "5", False),
        ("1000001", "1000000", False),  # was True: within a relative tolerance of 1e-6
        ("7/2", "3.5", True),
        (True, "1", False),
    ],
)
def test_is_correct(pred, gold, ok):
    assert is_correct(pred, gold) is ok


def test_evaluate_math_scores_and_writes_jsonl(tmp_path):
    examples = [
        {"prompt": "Ava has 2 cards and finds 3 more. How many?", "answer": "5"},
        {"prompt": "Ben has 10 and loses 4. How many?", "response": "10 - 4 = 6\n#### 6"},
        {"prompt": "Cleo has 3 rows of 3. How many?", "answer": "9"},
        {"prompt": "Dan is 7. How old is Dan?", "answer": "7"},
    ]
    replies = {
        "Q: Ava has 2 cards and finds 3 more. How many?\nA: ": "2 + 3 = 5\n#### 5",
        "Q: Ben has 10 and loses 4. How many?\nA: ": "10 - 4 = 7",  # wrong
        "Q: Cleo has 3 rows of 3. How many?\nA: ": "I do not know",  # no number
        "Q: Dan is 7. How old is Dan?\nA: ": "He is 7.0 years old",
    }
    calls = []

    def fake_generate(prompts):
        calls.append(list(prompts))
        return [replies[p] for p in prompts]

    out = tmp_path / "sub" / "preds.jsonl"
    result = evaluate_math(fake_generate, examples, "math", out, progress=False, chunk_size=3)
    assert result == {
        "accuracy": 0.5,
        "correct": 2,
        "total": 4,
        "no_answer": 1,
        "hit_max_new_tokens": 0,
        "scorer": "math-v2",
    }
    assert [len(c) for c in calls] == [3, 1]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, False, True]
    assert [r["extracted"] for r in rows] == ["5", "7", None, "7"]
    assert [r["gold"] for r in rows] == ["5", "6", "9", "7"]
    assert rows[0]["prompt"] == "Q: Ava has 2 cards and finds 3 more. How many?\nA: "
    assert rows[1]["output"] == "10 - 4 = 7"


def test_evaluate_math_counts_outputs_that_max_new_tokens_ended(tmp_path):
    """A reasoning chain cut off by max_new_tokens was scored on its last number, and nothing said it was cut."""
    from mgpo.eval.generate import Completion

    def cut_short(prompts):
        return [
            Completion.of("3 + 4 = 7, then 7 * 2", True),
            Completion.of("#### 14", False),
            Completion.of("7 * 2 = 14, 14 + 1", True),  # ends on "1": no answer, not a pass for the gold 1
            Completion.of("#### 1\nQ: Ann has 5 and gives", True),  # answered, then cut while rambling on
        ]

    out = tmp_path / "preds.jsonl"
    examples = [{"prompt": p, "answer": a} for p, a in (("a", "14"), ("b", "14"), ("c", "1"), ("d", "1"))]
    result = evaluate_math(cut_short, examples, "math", out, progress=False)
    assert (result["hit_max_new_tokens"], result["correct"], result["no_answer"]) == (3, 2, 2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["hit_max_new_tokens"] for r in rows] == [True, False, True, True]
    assert [r["extracted"] for r in rows] == [None, "14", None, "1"]


def test_rescore_gives_what_evaluate_math_gives_from_the_kept_answers(tmp_path):
    """A file scored by the earlier rule (the last number of a cut-off output) is scored again without generating."""
    from mgpo.eval.generate import Completion
    from mgpo.eval.math import rescore

    outputs = [Completion.of("44 + 4 = 4", True), Completion.of("#### 5", False), Completion.of("no idea", False)]
    examples = [{"prompt": p, "answer": a} for p, a in (("a", "4"), ("b", "5"), ("c", "2"))]
    out = tmp_path / "after_math.jsonl"
    fresh = evaluate_math(lambda prompts: outputs, examples, "math", out, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rows[0].update(extracted="4", correct=True)  # as the earlier rule scored it
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rescore(out) == {**fresh, "golds_kept": 0} and fresh["correct"] == 1
    assert [json.loads(line)["correct"] for line in out.read_text().splitlines()] == [False, True, False]
    assert rescore(out)["golds_kept"] == 0
    (tmp_path / "other.jsonl").write_text(json.dumps({"task_id": "x", "passed": True}) + "\n")
    with pytest.raises(ValueError, match="not a math per-sample file"):
        rescore(tmp_path / "other.jsonl")


def test_rescore_reads_each_gold_again_from_its_text_and_refuses_rows_it_cannot_read(tmp_path):
    """Each gold is read again from the kept gold_text (a gold misread as 4 is 3 again); a file without gold_text
    keeps its golds and says how many; a gold text today's rule reads no number in refuses the file, unchanged."""
    from mgpo.eval.math import rescore

    out = tmp_path / "after_math.jsonl"
    rows = [
        {"output": "#### 7", "gold": "7", "gold_text": "so #### 7", "hit_max_new_tokens": False},
        {"output": "#### 3", "gold": "4", "gold_text": "so #### 3", "hit_max_new_tokens": False},
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = rescore(out)
    assert (result["correct"], result["total"], result["golds_kept"]) == (2, 2, 0)
    assert [json.loads(line)["gold"] for line in out.read_text().splitlines()] == ["7", "3"]
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "gold_text"}) + "\n" for r in rows))
    result = rescore(out)
    assert (result["correct"], result["total"], result["golds_kept"]) == (1, 2, 2)
    rows[0]["gold_text"] = "The answer is: \\frac{1}{2}"  # a marked answer that is no number: no gold today
    before = "".join(json.dumps(r) + "\n" for r in rows)
    out.write_text(before)
    with pytest.raises(
        ValueError, match="reads no number in the gold answer of 1 rows \\(rows 0\\).*evaluate it again"
    ):
        rescore(out)
    assert out.read_text() == before


def test_evaluate_math_custom_template_and_no_file():
    seen = []

    def echo(prompts):
        seen.extend(prompts)
        return ["#### 3" for _ in prompts]

    result = evaluate_math(
        echo, [{"prompt": "one plus two", "answer": "3"}], "Question: {query}\nAnswer:", None, progress=False
    )
    assert result["accuracy"] == 1.0
    assert seen == ["Question: one plus two\nAnswer:"]


def test_evaluate_math_bad_input():
    good = [{"prompt": "q", "answer": "1"}]
    with pytest.raises(ValueError, match="no examples"):
        evaluate_math(lambda p: p, [], "math", None, progress=False)
    with pytest.raises(KeyError, match="'prompt'"):
        evaluate_math(lambda p: p, [{"question": "q", "answer": "1"}], "math", None, progress=False)
    with pytest.raises(ValueError, match="one completion per prompt"):
        evaluate_math(lambda p: [], good, "math", None, progress=False)
    with pytest.raises(ValueError, match="unknown prompt template"):
        evaluate_math(lambda p: p, good, "poem", None, progress=False)
    with pytest.raises(KeyError, match="gold answer|no 'answer'"):
        evaluate_math(lambda p: p, [{"prompt": "q"}], "math", None, progress=False)
