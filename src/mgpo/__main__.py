"""``python -m mgpo ...`` is the ``mgpo`` command (useful where console scripts are not on PATH yet)."""

from mgpo.cli import main

main()
