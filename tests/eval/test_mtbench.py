"""MT-Bench data loading, two-turn generation, and the judge client (openai) against a local fake endpoint that
fails as told: retries, a hard outage mid-run, a torn last line, resuming.

Only 127.0.0.1 is ever contacted.
"""

import json
import socket
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mgpo.eval.mtbench import (
    NEED_REFERENCE,
    NO_RATING,
    JudgeConfig,
    JudgeError,
    generate_answers,
    judge,
    load_judge_prompts,
    load_questions,
    load_reference_answers,
    parse_rating,
)

API_KEY = "test-key-123"


def fake_rating(prompt: str) -> int:
    """The fake judge's rating of a prompt: fixed per prompt, different across prompts (so averages mean something)."""
    return 1 + zlib.crc32(prompt.encode()) % 10


class FakeJudge(BaseHTTPRequestHandler):
    """Imitates POST /v1/chat/completions; remembers the requests it got and fails as told.

    ``plan`` maps a request's number (1 = the first this server got) to a failure: "500", "429", "drop" (close the
    connection without answering) or "slow" (answer after the client's timeout). From request ``down_from`` on,
    every request gets a 503 (a hard outage)."""

    requests: list = []
    plan: dict = {}
    down_from: int | None = None
    key: str | None = API_KEY

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        number = len(self.requests)
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": "not found"})
        if self.key and self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._send(401, {"error": {"message": "invalid api key"}})
        failure = self.plan.get(number)
        if self.down_from is not None and number >= self.down_from:
            failure = "503"
        if failure == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if failure == "slow":
            time.sleep(1.5)
        elif failure == "429":
            return self._send(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "10"})
        elif failure:
            return self._send(int(failure), {"error": {"message": "boom"}})
        prompt = body["messages"][-1]["content"]
        text = "The answer is vague." if "NO_RATING" in prompt else f"Helpful.\nRating: [[{fake_rating(prompt)}]]"
        return self._send(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            },
        )

    def _send(self, code, payload, headers=None):
        data = json.dumps(payload).encode()
        try:
            self.send_response(code)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # a "slow" answer the client stopped waiting for
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    FakeJudge.requests, FakeJudge.plan, FakeJudge.down_from, FakeJudge.key = [], {}, None, API_KEY
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("MGPO_TEST_JUDGE_KEY", API_KEY)
    return "MGPO_TEST_JUDGE_KEY"


def _answers():
    writing = {
        "question_id": 81,
        "category": "writing",
        "turns": ["Write a poem.", "Make it shorter."],
        "answers": ["Roses are red.", "Red."],
    }
    math = {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And 3+3?"], "answers": ["4", "6"]}
    return [writing, math]


SCORES = ("score", "score_turn_1", "score_turn_2", "per_category", "num_judged", "num_failed")


def _scores(result):
    return {k: result[k] for k in SCORES}


def _clean_run(server, api_key, tmp_path):
    """Scores and the requests of a run on a judge that never fails (the reference for the failure tests)."""
    config = JudgeConfig(url=server, model="fake-judge", api_key_env=api_key, timeout_s=5)
    result = judge(_answers(), config, tmp_path / "clean.jsonl")
    asked = [r["body"]["messages"][-1]["content"] for r in FakeJudge.requests]
    FakeJudge.requests.clear()
    return _scores(result), asked


def test_questions_and_prompts_load():
    questions = load_questions()
    assert len(questions) == 80
    assert len({q["question_id"] for q in questions}) == 80
    assert set(Counter(q["category"] for q in questions).values()) == {10}
    assert all(len(q["turns"]) == 2 and all(isinstance(t, str) and t for t in q["turns"]) for q in questions)
    prompts = load_judge_prompts()
    for name in ("single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn"):
        assert prompts[name]["output_format"] == "[[rating]]"
        assert "{" in prompts[name]["prompt_template"]
    references = load_reference_answers()
    needing = [q["question_id"] for q in questions if q["category"] in NEED_REFERENCE]
    assert len(needing) == 30 and all(len(references[i]) == 2 for i in needing)


def test_generate_answers_keeps_the_conversation():
    seen = []

    def chat(messages):
        seen.append(messages)
        return f"reply {len(messages)}"

    questions = load_questions()[:2]
    answers = generate_answers(chat, questions, progress=False)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert answers[0]["answers"] == ["reply 1", "reply 3"]
    assert seen[0] == [{"role": "user", "content": questions[0]["turns"][0]}]
    assert seen[1] == [
        {"role": "user", "content": questions[0]["turns"][0]},
        {"role": "assistant", "content": "reply 1"},
        {"role": "user", "content": questions[0]["turns"][1]},
    ]
    with pytest.raises(TypeError, match="must return a str"):
        generate_answers(lambda m: None, questions[:1], progress=False)


def test_judge_through_local_endpoint(server, api_key, tmp_path):
    config = JudgeConfig(url=server, model="fake-judge", api_key_env=api_key, timeout_s=5)
    out = tmp_path / "judged.jsonl"
    result = judge(_answers(), config, out)
    got = FakeJudge.requests
    assert len(got) == 4
    assert all(r["auth"] == f"Bearer {API_KEY}" and r["body"]["model"] == "fake-judge" for r in got)
    assert all(r["body"]["temperature"] == 0 for r in got)
    first_writing, second_writing, first_math, second_math = (r["body"]["messages"] for r in got)
    assert "Roses are red." in first_writing[-1]["content"] and "Write a poem." in first_writing[-1]["content"]
    assert "Make it shorter." in second_writing[-1]["content"]
    reference = load_reference_answers()[111]
    assert reference[0] in first_math[-1]["content"]
    assert reference[1] in second_math[-1]["content"]
    ratings = [fake_rating(m[-1]["content"]) for m in (first_writing, second_writing, first_math, second_math)]
    assert result["judged"] is True
    assert result["score"] == pytest.approx(sum(ratings) / 4)
    assert result["score_turn_1"] == pytest.approx((ratings[0] + ratings[2]) / 2)
    assert result["per_category"] == pytest.approx(
        {"writing": (ratings[0] + ratings[1]) / 2, "math": (ratings[2] + ratings[3]) / 2}
    )
    assert result["num_judged"] == 4 and result["num_failed"] == 0 and result["num_reused"] == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["question_id"], r["turn"], r["rating"]) for r in rows] == [
        (81, 1, ratings[0]),
        (81, 2, ratings[1]),
        (111, 1, ratings[2]),
        (111, 2, ratings[3]),
    ]


def test_the_client_retries_failures_and_scores_stay_the_same(server, api_key, tmp_path):
    expected, _ = _clean_run(server, api_key, tmp_path)
    # Each judgement's first request fails differently: HTTP 500, HTTP 429, a dropped connection, a timeout.
    FakeJudge.plan = {1: "500", 3: "429", 5: "drop", 7: "slow"}
    config = JudgeConfig(url=server, model="fake-judge", api_key_env=api_key, timeout_s=0.5, max_retries=1)
    result = judge(_answers(), config, tmp_path / "judged.jsonl")
    assert len(FakeJudge.requests) == 8  # four judgements, each asked twice
    assert _scores(result) == expected


def test_an_outage_mid_run_keeps_the_judgements_and_a_rerun_asks_only_for_the_missing(server, api_key, tmp_path):
    expected, asked = _clean_run(server, api_key, tmp_path)
    FakeJudge.down_from = 3  # two judgements arrive, then the judge is down for good
    config = JudgeConfig(url=server, model="fake-judge", api_key_env=api_key, timeout_s=5, max_retries=1)
    out = tmp_path / "judged.jsonl"
    with pytest.raises(JudgeError) as failed:
        judge(_answers(), config, out)
    message = str(failed.value)
    assert f"HTTP 503 from {server}/chat/completions" in message
    assert "question 111 turn 1" in message and f"2 judgement(s) are kept in {out}" in message
    assert "rerun to resume" in message
    assert len(FakeJudge.requests) == 4  # 2 answered, then the third judgement: first try and one retry
    assert [(json.loads(line)["question_id"], json.loads(line)["turn"]) for line in out.read_text().splitlines()] == [
        (81, 1),
        (81, 2),
    ]

    FakeJudge.down_from = None
    FakeJudge.requests.clear()
    result = judge(_answers(), config, out)
    assert [r["body"]["messages"][-1]["content"] for r in FakeJudge.requests] == asked[2:]
    assert result["num_reused"] == 2
    assert _scores(result) == expected
    assert len(out.read_text().splitlines()) == 4


def test_a_torn_last_line_is_dropped_and_asked_for_again(server, api_key, tmp_path, capsys):
    expected, asked = _clean_run(server, api_key, tmp_path)
    out = tmp_path / "clean.jsonl"
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # a crash while the 4th was written
    config = JudgeConfig(url=server, model="fake-judge", api_key_env=api_key, timeout_s=5)
    result = judge(_answers(), config, out)
    assert f"{out}: dropped a torn last line" in capsys.readouterr().err
    assert [r["body"]["messages"][-1]["content"] for r in FakeJudge.requests] == asked[3:]
    assert _scores(result) == expected
    assert [json.loads(line)["turn"] for line in out.read_text().splitlines()] == [1, 2, 1, 2]


def test_a_broken_line_before_the_last_stops_the_run(server, api_key, tmp_path):
    out = tmp_path / "judged.jsonl"
    out.write_text('{"question_id": 81\n{}\n')
    config = JudgeConfig(url=server, model="fake-judge", api_key_env=api_key, timeout_s=5)
    with pytest.raises(ValueError, match=f"{out}:1 is not a JSON line"):
        judge(_answers(), config, out)
    assert FakeJudge.requests == []


def test_judgements_of_other_answers_or_another_judge_are_not_reused(server, api_key, tmp_path):
    _clean_run(server, api_key, tmp_path)
    out = tmp_path / "clean.jsonl"
    answers = _answers()
    answers[1]["answers"] = ["5", "7"]
    config = JudgeConfig(url=server, model="fake-judge", api_key_env=api_key, timeout_s=5)
    assert judge(answers, config, out)["num_reused"] == 2
    assert len(FakeJudge.requests) == 2 and all(
        "7" in r["body"]["messages"][-1]["content"] for r in FakeJudge.requests[1:]
    )
    config = JudgeConfig(url=server, model="other-judge", api_key_env=api_key, timeout_s=5)
    assert judge(answers, config, out)["num_reused"] == 0
    assert len(FakeJudge.requests) == 6
    assert len(out.read_text().splitlines()) == 4


def test_a_judgement_without_a_rating_is_recorded_and_counted(server, api_key, tmp_path, capsys):
    answers = _answers()
    answers[1]["answers"] = ["4", "NO_RATING"]
    config = JudgeConfig(url=server, model="fake-judge", api_key_env=api_key, timeout_s=5)
    out = tmp_path / "judged.jsonl"
    result = judge(answers, config, out)
    assert result["num_judged"] == 3 and result["num_unrated"] == 1 and result["num_failed"] == 1
    rated = [fake_rating(r["body"]["messages"][-1]["content"]) for r in FakeJudge.requests[:3]]
    assert result["score"] == pytest.approx(sum(rated) / 3)
    assert result["failures"] == [f"question 111 turn 2: {NO_RATING}"]
    assert "1 without a parsable [[rating]]" in capsys.readouterr().err
    last = json.loads(out.read_text().splitlines()[-1])
    assert last["rating"] is None and last["error"] == NO_RATING and last["judgment"] == "The answer is vague."
    assert judge(answers, config, out)["num_unrated"] == 1 and len(FakeJudge.requests) == 4  # kept, not re-asked


def test_an_endpoint_without_authentication_gets_no_key(server, tmp_path):
    FakeJudge.key = None
    config = JudgeConfig(url=server, model="fake-judge", api_key_env="", timeout_s=5)
    assert judge(_answers(), config, tmp_path / "judged.jsonl")["num_judged"] == 4
    assert [r["auth"] for r in FakeJudge.requests] == [None] * 4


def test_rejected_key_is_a_clear_error(server, monkeypatch, tmp_path):
    monkeypatch.setenv("MGPO_TEST_JUDGE_KEY", "wrong-key")
    config = JudgeConfig(url=server, model="fake-judge", api_key_env="MGPO_TEST_JUDGE_KEY", timeout_s=5)
    with pytest.raises(JudgeError, match="HTTP 401.*question 81 turn 1.*0 judgement"):
        judge(_answers(), config, tmp_path / "judged.jsonl")
    assert len(FakeJudge.requests) == 1  # a 401 is not retried


def test_missing_api_key_env_is_a_clear_error(server, monkeypatch, tmp_path):
    monkeypatch.delenv("MGPO_TEST_MISSING_KEY", raising=False)
    config = JudgeConfig(url=server, model="fake-judge", api_key_env="MGPO_TEST_MISSING_KEY")
    with pytest.raises(JudgeError, match="MGPO_TEST_MISSING_KEY is not set"):
        judge(_answers(), config, tmp_path / "judged.jsonl")
    assert FakeJudge.requests == []


def test_unreachable_endpoint_fails_fast(tmp_path, api_key):
    with socket.socket() as s:  # a port that nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = JudgeConfig(
        url=f"http://127.0.0.1:{port}/v1", model="fake-judge", api_key_env=api_key, timeout_s=2, max_retries=1
    )
    start = time.monotonic()
    with pytest.raises(JudgeError, match=f"cannot reach the judge at http://127.0.0.1:{port}/v1/chat/completions"):
        judge(_answers(), config, tmp_path / "judged.jsonl")
    assert time.monotonic() - start < 5


def test_without_config_answers_are_written_not_judged(tmp_path):
    out = tmp_path / "sub" / "answers.jsonl"
    result = judge(_answers(), None, out)
    assert result["judged"] is False
    assert result["message"] == f"answers written to {out} were not judged: no judge endpoint configured"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == _answers()


@pytest.mark.parametrize(
    "text, rating",
    [
        ("Good.\nRating: [[7]]", 7.0),
        ("[[8.5]]", 8.5),
        ("score [9]", 9.0),
        ("Rating: [[11]]", None),
        ("no score", None),
        ("[[0]]", None),
    ],
)
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="not an http"):
        JudgeConfig(url="127.0.0.1:8000", model="m")
    with pytest.raises(ValueError, match="model is empty"):
        JudgeConfig(url="http://127.0.0.1:8000/v1", model="")
