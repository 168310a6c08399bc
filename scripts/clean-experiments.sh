#!/usr/bin/env bash
# Runs issue 17's clean-loss sweeps in order, resumably, and keeps each finished run's record (config.yaml,
# metrics.json, log.jsonl, and the sweep's spec and index) under docs/experiments-clean/runs/<sweep>/, which is
# what docs/experiments-clean is built from. A run kept there but missing under runs/ (a fresh checkout) is put
# back first, so the sweep skips it instead of training it again. Checkpoints and adapters are not kept.
#
#   bash scripts/clean-experiments.sh            # run (or resume) every sweep listed below; Ctrl-C stops after a checkpoint
#   bash scripts/clean-experiments.sh --commit   # ... and git-commit each newly kept run record
#   bash scripts/clean-experiments.sh --commit cpu-verdicts-tweets cpu-verdicts-dd   # only these sweeps, in this order
#   MGPO_SRC=/path/to/frozen/src bash scripts/clean-experiments.sh   # train with a frozen copy of the code
#   MGPO_ROOT=/path/to/checkout bash /tmp/copy-of-this-script.sh   # run a copy (bash reads a script as it runs it:
#                                                                  # editing the running file would break it)
set -uo pipefail
cd "${MGPO_ROOT:-$(dirname "$0")/..}" || exit 1
# the sweeps that decide whether a radius rule is shipped (every task it must not lose on) before the method
# table, which would take a shipped rule as a third arm (none passed: docs/results.md)
# then issue 33's reruns: the verdicts over every test row with per-example predictions and declared families
sweeps=(cpu-dd-clean cpu-dd-clean-full cpu-core-tweets cpu-arithmetic-core cpu-ablation-clean cpu-methods-clean
        cpu-methods-uncapped cpu-verdicts-tweets cpu-verdicts-methods cpu-verdicts-dd cpu-verdicts-paper-rho
        cpu-verdicts-arithmetic)
keep=docs/experiments-clean/runs
every=${MGPO_KEEP_EVERY:-60}  # seconds between looks for newly finished runs
commit=false; [[ "${1:-}" == "--commit" ]] && { commit=true; shift; }
if (($#)); then  # sweeps named on the command line: each must be a config under configs/experiments/
  for s in "$@"; do
    [[ -f "configs/experiments/$s.yaml" ]] || { echo "no sweep named '$s': expected configs/experiments/$s.yaml" >&2; exit 2; }
  done
  sweeps=("$@")
fi
[[ -n "${MGPO_SRC:-}" ]] && export PYTHONPATH="$MGPO_SRC${PYTHONPATH:+:$PYTHONPATH}"

restore() {  # kept, finished runs -> runs/experiments/<sweep>/<run>
  local s=$1 a n
  for a in "$keep/$s"/*/; do
    [[ -f "$a/metrics.json" ]] || continue
    n=$(basename "$a")
    [[ -f "runs/experiments/$s/$n/metrics.json" ]] && continue
    mkdir -p "runs/experiments/$s/$n" && cp "$a"/config.yaml "$a"/log.jsonl "runs/experiments/$s/$n/" \
      && { [[ ! -f "$a/predictions.jsonl" ]] || cp "$a/predictions.jsonl" "runs/experiments/$s/$n/"; } \
      && cp "$a"/metrics.json "runs/experiments/$s/$n/" && echo "restored $s/$n from $keep"
  done
}

save() {  # finished runs under runs/experiments/<sweep> -> $keep/<sweep>; metrics.json last (it marks a run done)
  local s=$1 d n new=0
  for d in "runs/experiments/$s"/*/; do
    [[ -f "$d/metrics.json" ]] || continue
    n=$(basename "$d")
    [[ -f "$keep/$s/$n/metrics.json" ]] && continue
    mkdir -p "$keep/$s/$n" && cp "$d"/config.yaml "$d"/log.jsonl "$keep/$s/$n/" \
      && { [[ ! -f "$d/predictions.jsonl" ]] || cp "$d/predictions.jsonl" "$keep/$s/$n/"; } \
      && cp "$d"/metrics.json "$keep/$s/$n/" \
      && new=$((new + 1))
  done
  [[ $new != 0 ]] && cp "runs/experiments/$s"/sweep.yaml "runs/experiments/$s"/index.json "$keep/$s/" 2>/dev/null
  # only the kept records are committed: whatever else is staged or changed in this checkout stays as it is
  if $commit && [[ -d "$keep/$s" && -n $(git status --porcelain -- "$keep/$s") ]]; then
    git add "$keep/$s" && git commit -q -m "experiments: $s, $(ls -d "$keep/$s"/*/ | wc -l) runs kept" -- "$keep/$s" \
      || echo "could not commit $keep/$s now (another git command running?); the next look retries" >&2
  fi
}

status=0
for s in "${sweeps[@]}"; do
  restore "$s"
  mgpo sweep "configs/experiments/$s.yaml" &
  pid=$!
  # a background job ignores SIGINT: stop its training run instead (it checkpoints, exits 143, the sweep stops)
  trap 'pkill -TERM -P $pid' INT TERM
  while kill -0 $pid 2>/dev/null; do sleep "$every" & wait $!; save "$s"; done
  wait $pid; code=$?
  save "$s"
  if [[ $code == 130 ]]; then echo "stopped during $s: rerun to resume"; exit 130; fi
  if [[ $code != 0 ]]; then
    echo "$s ended with exit code $code (its failed runs are retried on the next call)" >&2; status=1
  fi
done
exit $status
