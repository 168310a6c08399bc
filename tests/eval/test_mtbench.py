"""MT-Bench data loading, two-turn generation, and the judge client against a local fake endpoint.

Only 127.0.0.1 is ever contacted.
"""

import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mgpo.eval.mtbench import (
    NEED_REFERENCE,
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


class FakeJudge(BaseHTTPRequestHandler):
    """Imitates POST /v1/chat/completions; remembers the requests it got."""

    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": "not found"})
        if self.headers.get("Authorization") != f"Bearer {API_KEY}":
            return self._send(401, {"error": {"message": "invalid api key"}})
        prompt = body["messages"][-1]["content"]
        if "SERVER_ERROR" in prompt:
            return self._send(500, {"error": "boom"})
        text = "The answer is vague." if "NO_RATING" in prompt else "Helpful and correct.\nRating: [[7]]"
        self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}]})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    FakeJudge.requests = []
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
    writing = {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Make it shorter."],
               "answers": ["Roses are red.", "Red."]}
    math = {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And 3+3?"],
            "answers": ["4", "6"]}
    return [writing, math]


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
    assert seen[1] == [{"role": "user", "content": questions[0]["turns"][0]},
                       {"role": "assistant", "content": "reply 1"},
                       {"role": "user", "content": questions[0]["turns"][1]}]
    with pytest.raises(TypeError, match="must return a str"):
        generate_answers(lambda m: None, questions[:1], progress=False)


def test_judge_through_local_endpoint(server, api_key, tmp_path):
    config = JudgeConfig(url=server, model="fake-judge", api_key_env=api_key, timeout_s=5)
    out = tmp_path / "judged.jsonl"
    result = judge(_answers(), config, out)
    assert result["judged"] is True
    assert result["score"] == 7 and result["score_turn_1"] == 7 and result["score_turn_2"] == 7
    assert result["num_judged"] == 4 and result["num_failed"] == 0
    assert result["per_category"] == {"math": 7, "writing": 7}
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
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["question_id"], r["turn"], r["rating"]) for r in rows] == [(81, 1, 7), (81, 2, 7), (111, 1, 7), (111, 2, 7)]


def test_bad_judgements_are_counted_not_fatal(server, api_key, tmp_path):
    answers = _answers()
    answers[1]["answers"] = ["4", "NO_RATING"]
    config = JudgeConfig(url=server, model="fake-judge", api_key_env=api_key, timeout_s=5, max_retries=1)
    result = judge(answers, config, tmp_path / "judged.jsonl")
    assert result["num_judged"] == 3 and result["num_failed"] == 1
    assert result["score"] == 7
    assert any("no [[rating]]" in f for f in result["failures"])
    answers[1]["answers"] = ["4", "SERVER_ERROR"]
    result = judge(answers, config, tmp_path / "judged.jsonl")
    assert result["num_failed"] == 1 and "HTTP 500" in result["failures"][0]
    assert sum("SERVER_ERROR" in r["body"]["messages"][-1]["content"] for r in FakeJudge.requests) == 2  # 1 retry


def test_rejected_key_is_a_clear_error(server, monkeypatch, tmp_path):
    monkeypatch.setenv("MGPO_TEST_JUDGE_KEY", "wrong-key")
    config = JudgeConfig(url=server, model="fake-judge", api_key_env="MGPO_TEST_JUDGE_KEY", timeout_s=5)
    with pytest.raises(JudgeError, match="HTTP 401"):
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
    config = JudgeConfig(url=f"http://127.0.0.1:{port}/v1", model="fake-judge", api_key_env=api_key,
                         timeout_s=2, max_retries=1)
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


@pytest.mark.parametrize("text, rating", [
    ("Good.\nRating: [[7]]", 7.0), ("[[8.5]]", 8.5), ("score [9]", 9.0), ("Rating: [[11]]", None),
    ("no score", None), ("[[0]]", None),
])
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="not an http"):
        JudgeConfig(url="127.0.0.1:8000", model="m")
    with pytest.raises(ValueError, match="model is empty"):
        JudgeConfig(url="http://127.0.0.1:8000/v1", model="")
