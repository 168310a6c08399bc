"""The code that runs in the sandboxed process (launcher.py) and in the judge's harness (harness.py), and the
codec both use (codec.py): real modules, seen by the linter and the type checker, sent as text.

Each program is sent as ``python -c`` text: the codec's source, then the program's with its one
``from .codec import`` statement dropped (the codec's names are then defined above it). Nothing is imported from
a file at run time: inside bubblewrap the mgpo project and every package folder are masked.
"""

from __future__ import annotations

import re
from pathlib import Path

_HERE = Path(__file__).parent
# The program's import of the codec, on one or more lines (a parenthesised name list).
_CODEC_IMPORT = re.compile(r"^from \.codec import (\([^)]*\)|[^\n]*)\n", re.MULTILINE)


def source(name: str) -> str:
    """``python -c`` text of the program ``name`` ("launcher" or "harness"): the codec, then the program."""
    program = (_HERE / f"{name}.py").read_text()
    body, found = _CODEC_IMPORT.subn("", program)
    if found != 1:
        raise RuntimeError(
            f"sandbox: {name}.py must import the codec in exactly one `from .codec import` "
            f"statement (found {found}); it is replaced by the codec's text when sent."
        )
    codec = (_HERE / "codec.py").read_text()
    # `from __future__` must open the text: drop the program's, the codec's comes first
    body = body.replace("from __future__ import annotations\n", "", 1)
    return codec + "\n\n# ---- " + name + ".py ----\n" + body


LAUNCHER = source("launcher")
HARNESS = source("harness")
