"""The judge's harness: a separate, trusted process outside the sandbox, as the parent's user
(``python -I -S -B -c <codec + this file>``; the tests arrive on stdin).

It runs the test code, which calls ``candidate``: a proxy that sends the arguments to the sandboxed program and
returns the decoded reply (plain data) or raises :class:`CandidateError`. The verdict is this process's exit status,
which the program cannot reach: 0 only when the test code ran to its end. Its own limits (SandboxLimits.harness_*,
reply_*, decode_s) bound what the program's replies can cost it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

from .codec import (
    EXIT_ASSERT,
    EXIT_ERROR,
    EXIT_EXIT,
    EXIT_GONE,
    EXIT_JUDGE_MEMORY,
    EXIT_MEMORY,
    EXIT_REPLY,
    ReplyLimit,
    decode,
    encode,
    read_frame,
    write_frame,
)

TYPE_CHECKING = False  # typing costs ~13 ms at each start of a sandboxed process: for checkers only
if TYPE_CHECKING:
    from typing import Any, NoReturn


class CandidateError(Exception):
    """The program's function raised; only its type name and message crossed the boundary. The message is the
    program's text, so it is quoted (repr: one line, escaped) and says whose it is."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"the candidate raised {type_name} (the program's message: {message!r})")
        self.type_name = type_name


class Gone(BaseException):
    """The program's process ended or closed the channel."""


class Malformed(BaseException):
    """The program sent something that is not a well-formed reply."""


class OutOfMemory(BaseException):
    """This process ran out of memory reading or decoding a reply."""


class Channel:
    """The two pipes to the program, with the bounds on what its replies may cost."""

    def __init__(
        self, req_fd: int, rep_fd: int, max_reply: int, max_depth: int, max_items: int, decode_s: float
    ) -> None:
        self.req_fd, self.rep_fd = req_fd, rep_fd
        self.max_reply, self.max_depth, self.max_items, self.decode_s = max_reply, max_depth, max_items, decode_s
        self.spent = 0.0  # CPU seconds spent reading and decoding replies, over the whole run

    def candidate(self, *args: Any, **kwargs: Any) -> Any:
        try:
            write_frame(self.req_fd, {"args": encode(list(args)), "kwargs": encode(dict(kwargs))})
        except BrokenPipeError:
            raise Gone() from None
        return self.receive()

    def receive(self) -> Any:
        if self.spent > self.decode_s:
            raise ReplyLimit(
                f"decoding the replies took more than {self.decode_s} s of CPU time (SandboxLimits.decode_s)"
            )
        start = time.process_time()
        deadline = start + self.decode_s - self.spent
        try:
            reply = read_frame(self.rep_fd, self.max_reply, deadline)
            if reply is None:
                raise Gone()
            if type(reply) is dict and len(reply) == 1 and "return" in reply:
                return decode(reply["return"], self.max_depth, self.max_items, deadline)
            raised = reply.get("raise") if type(reply) is dict and len(reply) == 1 else None
            if (
                type(raised) is list
                and len(raised) == 2
                and all(type(x) is str for x in raised)
                and raised[0].isidentifier()
            ):
                raise CandidateError(raised[0][:100], raised[1][:1000])
            raise Malformed(f"unexpected reply: {json.dumps(reply)[:200]!r}")
        except CandidateError:
            raise
        except RecursionError:
            raise ReplyLimit("a reply nested deeper than this interpreter decodes") from None
        except MemoryError:
            raise OutOfMemory() from None
        except Exception as err:  # json.loads, decode, an unhashable key: never an exception the tests could catch
            raise Malformed(f"{type(err).__name__}: {err}"[:500]) from None
        finally:
            self.spent += time.process_time() - start


def _fail(status: int, message: str) -> NoReturn:
    sys.stderr.write(message)
    sys.stderr.flush()
    os._exit(status)


def main() -> NoReturn:
    mem_b, cpu_s, req_fd, rep_fd, max_reply, max_depth, max_items = (int(a) for a in sys.argv[1:8])
    resource.setrlimit(resource.RLIMIT_AS, (mem_b, mem_b))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    tests = sys.stdin.read()
    channel = Channel(req_fd, rep_fd, max_reply, max_depth, max_items, float(sys.argv[8]))
    namespace = {"__name__": "__main__", "candidate": channel.candidate}
    try:
        exec(compile(tests, "<tests>", "exec"), namespace)
    except Gone:
        os._exit(EXIT_GONE)
    except Malformed as err:
        _fail(EXIT_ERROR, f"malformed reply from the program: {err}\n")
    except ReplyLimit as err:
        _fail(EXIT_REPLY, f"the program's reply is over the judge's bounds: {err}\n")
    except OutOfMemory:
        _fail(EXIT_JUDGE_MEMORY, "the judge ran out of memory reading a reply\n")
    except BaseException as err:
        # The message last, quoted: the tests' own messages can hold the program's text (str(candidate(x)))
        sys.stdout.flush()
        message = str(err) if isinstance(err, CandidateError) else repr(str(err))
        text = (
            "Traceback (most recent call last):\n"
            + "".join(traceback.format_tb(err.__traceback__))
            + f"{type(err).__name__}: {message}\n"
        )
        if isinstance(err, CandidateError):  # the program's function raised it
            _fail(
                {"AssertionError": EXIT_ASSERT, "MemoryError": EXIT_MEMORY, "SystemExit": EXIT_EXIT}.get(
                    err.type_name, EXIT_ERROR
                ),
                text,
            )
        _fail(
            EXIT_JUDGE_MEMORY
            if isinstance(err, MemoryError)
            else EXIT_ASSERT
            if isinstance(err, AssertionError)
            else EXIT_ERROR,
            text,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
