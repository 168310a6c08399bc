"""What a sandboxed run may use (SandboxLimits) and how it ended (RunResult)."""

from __future__ import annotations

from dataclasses import dataclass, field

ISOLATIONS = ("auto", "bwrap", "process")


@dataclass
class SandboxLimits:
    """Limits for one sandboxed program run."""

    timeout_s: float = field(
        default=10.0, metadata={"help": "Wall-clock limit in seconds; then the process group is killed."}
    )
    cpu_s: int = field(default=10, metadata={"help": "CPU-time limit in seconds (RLIMIT_CPU)."})
    memory_mb: int = field(default=512, metadata={"help": "Address-space limit in MiB of each process (RLIMIT_AS)."})
    max_processes: int = field(
        default=4,
        metadata={
            "help": "RLIMIT_NPROC: processes of the running user (enforced for non-root users only; inside "
            "bubblewrap bwrap's own init process counts as one)."
        },
    )
    max_file_mb: int = field(
        default=16, metadata={"help": "Largest file the program may write, captured output included (RLIMIT_FSIZE)."}
    )
    tmpfs_mb: int = field(
        default=64,
        metadata={
            "help": "Size of each of the two in-memory file systems under bubblewrap: /tmp (also the scratch "
            "directory) and /dev/shm."
        },
    )
    memory_budget_mb: int = field(
        default=2560,
        metadata={
            "help": "The most memory all of a program's processes together may hold: max_processes x memory_mb + 2 x "
            "tmpfs_mb must not exceed it."
        },
    )
    max_output_chars: int = field(
        default=4000, metadata={"help": "How many characters of stdout/stderr to keep in the result."}
    )
    user: str = field(
        default="nobody", metadata={"help": "When the parent is root, run the program as this user ('' = stay root)."}
    )
    python: str = field(
        default="",
        metadata={"help": "Interpreter to run the program with ('' = this one, or a system python the user can run)."},
    )
    guard: bool = field(
        default=True,
        metadata={"help": "Install the Python-level guard (write/process/signal blocking) before the code runs."},
    )
    isolation: str = field(
        default="auto",
        metadata={
            "help": "auto: bubblewrap namespaces when bwrap works, else the process sandbox with a warning; bwrap: "
            "require it; process: never use it."
        },
    )
    allow_visible_answers: bool = field(
        default=False,
        metadata={
            "help": "Without bubblewrap (isolation 'process') no file can be hidden, so judge() refuses to grade a "
            "dataset whose answers are on disk (its `hidden` paths). True grades anyway and marks every result "
            "answers_visible=True."
        },
    )
    harness_cpu_s: int = field(
        default=10,
        metadata={
            "help": "CPU-time limit of the judge's harness (the trusted tests), separate from the program's cpu_s."
        },
    )
    harness_memory_mb: int = field(
        default=1024,
        metadata={"help": "Address-space limit in MiB of the judge's harness, separate from the program's memory_mb."},
    )
    reply_mb: int = field(
        default=4,
        metadata={
            "help": "Largest reply (MiB of JSON) the judge's harness reads for one call of the program's function; a "
            "larger one is not read."
        },
    )
    reply_depth: int = field(
        default=64,
        metadata={"help": "Deepest nesting of lists, tuples, dicts and sets the harness decodes in one reply."},
    )
    reply_items: int = field(default=1_000_000, metadata={"help": "Most values the harness decodes in one reply."})
    decode_s: float = field(
        default=2.0,
        metadata={
            "help": "CPU seconds the harness may spend reading and decoding the program's replies over a whole run."
        },
    )

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise ValueError(
                f"SandboxLimits.isolation={self.isolation!r} is invalid: choose one of {', '.join(ISOLATIONS)}."
            )
        for name in (
            "timeout_s",
            "cpu_s",
            "memory_mb",
            "max_processes",
            "max_file_mb",
            "tmpfs_mb",
            "memory_budget_mb",
            "max_output_chars",
            "harness_cpu_s",
            "harness_memory_mb",
            "reply_mb",
            "reply_depth",
            "reply_items",
            "decode_s",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"SandboxLimits.{name}={value!r} is invalid: it must be a positive number.")
        # Without a cgroup the per-process limits are the only bound, so their product is what a program can hold.
        total = self.max_processes * self.memory_mb + 2 * self.tmpfs_mb
        if total > self.memory_budget_mb:
            raise ValueError(
                f"SandboxLimits: max_processes x memory_mb + 2 x tmpfs_mb = {self.max_processes} x "
                f"{self.memory_mb} + 2 x {self.tmpfs_mb} = {total} MiB exceeds memory_budget_mb="
                f"{self.memory_budget_mb}: lower max_processes or memory_mb, or raise the budget."
            )


@dataclass
class RunResult:
    """Outcome of one program run.

    status is one of: "passed", "failed" (assertion error or exit before the end), "error" (any other
    exception, syntax errors and blocked operations included), "timeout" (wall-clock or CPU limit),
    "memory" (memory limit, the program's or the judge's), "file_limit" (file/output size limit),
    "reply_limit" (a reply over the judge's own bounds: SandboxLimits.reply_mb, reply_depth, reply_items,
    decode_s, or a set of colliding keys), "killed" (any other signal).

    detail starts with the sandbox's reason; text the program wrote (its stderr, the message of an exception its
    function raised) follows, marked as the program's. answers_visible is True when the run could read answer
    files it was meant not to see (isolation 'process' with allow_visible_answers).
    """

    passed: bool
    status: str
    detail: str
    duration_s: float
    output: str = ""
    answers_visible: bool = False
