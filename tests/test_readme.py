"""What README.md's and docs/'s snippets need to run as written, without the doc-test runner: a standard-library
module a Python block uses is imported in that block, and two README commands that train different runs write to
different folders (mgpo train refuses a folder holding another run)."""

from __future__ import annotations

import ast
import re
import shlex
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_a_python_block_imports_the_standard_modules_it_uses():
    missing = []
    for path in DOCS:
        for code in blocks(path, "python"):
            tree = ast.parse(code)
            imported = {
                alias.asname or alias.name.split(".")[0]
                for node in ast.walk(tree)
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names
            }
            used = {
                node.value.id
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in sys.stdlib_module_names
            }
            missing += [f"{path.name}: {name} in {code.splitlines()[0]!r}" for name in sorted(used - imported)]
    assert not missing, missing


def test_readme_train_commands_of_different_runs_use_different_folders():
    folders = {}  # output folder -> the first command training into it
    for code in blocks(ROOT / "README.md", "bash"):
        for line in code.splitlines():
            args = shlex.split(line, comments=True)
            if args[:2] != ["mgpo", "train"] or {"--resume", "--restart"} & set(args):
                continue  # --resume / --restart continue or redo the run above them, in its folder
            config = yaml.safe_load((ROOT / args[2]).read_text())
            out = next(
                (a.split("=", 1)[1] for a in args if a.startswith("training.output_dir=")),
                config["training"]["output_dir"],
            )
            first = folders.setdefault(out, args)
            assert first == args, f"{shlex.join(first)} and {shlex.join(args)} both write {out}"


def test_every_documented_mgpo_command_names_a_command_and_files_that_exist():
    """The shell blocks are too long to run in CI (training runs, sweeps of hours); what they name must exist: the
    mgpo subcommand, and every config, spec, script and benchmark file."""
    from mgpo.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    problems = []
    for path in DOCS:
        for code in blocks(path, "bash"):
            for line in code.splitlines():
                try:
                    args = shlex.split(line, comments=True)
                except ValueError:
                    continue
                for i, word in enumerate(args):
                    if (
                        word == "mgpo"
                        and i + 1 < len(args)
                        and not args[i + 1].startswith("-")
                        and (i == 0 or args[i - 1] in ("-m", "&&", ";", "|"))
                    ):
                        if args[i + 1] not in commands:
                            problems.append(f"{path.name}: unknown command in {line.strip()!r}")
                    if (
                        re.fullmatch(r"(configs|scripts|benchmarks)/[\w./-]+\.(yaml|sh|py)", word)
                        and not (ROOT / word).is_file()
                    ):
                        problems.append(f"{path.name}: {word} does not exist ({line.strip()!r})")
    assert not problems, problems
