"""Package layout: no import cycles between mgpo's modules (imports inside functions included), and the
lightweight entry points stay light (``import mgpo`` and ``mgpo config --explain`` load neither torch nor
transformers nor PEFT)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """mgpo module -> the mgpo modules it imports (anywhere in the file), packages' __init__ left out."""
    modules = {module_name(p): p for p in (SRC / "mgpo").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mgpo"):
                candidates = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names if a.name.startswith("mgpo")]
            else:
                continue
            found.update(c for c in candidates if c in modules and not (SRC / c.replace(".", "/")).is_dir())
        graph[name] = found - {name}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    assert graph["mgpo.data.text"] and graph["mgpo.data.instruct"]  # the graph sees imports at all
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "accelerate")


def loaded_after(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("loaded:")][-1]
    return [m for m in line.removeprefix("loaded:").split(",") if m]


def test_import_mgpo_and_the_configs_are_light():
    assert loaded_after("import mgpo, mgpo.optim.configs, mgpo.pipelines.config") == []


def test_config_check_loads_no_ml_library():
    code = "from mgpo.pipelines.config import load_config\nload_config(None, ['data.name=glue/sst2'])"
    assert loaded_after(code) == []


def test_config_explain_loads_no_ml_library():
    code = (
        "from typer.testing import CliRunner\nfrom mgpo.cli import app\n"
        "result = CliRunner().invoke(app, ['config', '--explain'])\n"
        "assert result.exit_code == 0 and 'perturbation.rho' in result.output and 'training.mixed_precision' "
        "in result.output, result.output"
    )
    assert loaded_after(code) == []


def test_mgpo_report_loads_no_ml_library(tmp_path):
    """`mgpo report` reads JSON, YAML and CSV: a whole report, figures and all, without transformers, torch or
    PEFT (it imported transformers through the train pipeline, and the CLI quieted transformers' logs first)."""
    runs = SRC.parent / "docs" / "experiments-clean" / "runs" / "cpu-methods-uncapped"
    two = [str(p) for p in sorted(runs.iterdir()) if p.is_dir()][:2]
    code = (
        "from typer.testing import CliRunner\nfrom mgpo.cli import app\n"
        f"result = CliRunner().invoke(app, ['report', *{two!r}, '--out', {str(tmp_path)!r}])\n"
        "assert result.exit_code == 0, result.output"
    )
    assert loaded_after(code) == []
    assert (tmp_path / "report.md").is_file()


def test_lazy_names_resolve():
    assert loaded_after("import mgpo\nassert mgpo.MGPO.__name__ == 'MGPO' and callable(mgpo.create_optimizer)") == [
        "torch"
    ]
