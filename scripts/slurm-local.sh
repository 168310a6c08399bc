#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the sweep tests: munged, slurmctld and slurmd, run as root,
# without systemd, cgroups or slurmdbd (so no sacct). Everything (slurm.conf, munge key, state, spool, logs, pid files)
# lives under STATE_DIR.
# Usage: bash scripts/slurm-local.sh start|stop|status [STATE_DIR]     (STATE_DIR defaults to /tmp/mgpo-slurm)
#   start   starts the daemons (or says they already run), waits until the node is idle, prints
#           `export SLURM_CONF=STATE_DIR/slurm.conf` (also written to STATE_DIR/env, for `source`)
#   stop    cancels the cluster's jobs, stops the daemons and waits for them to go
#   status  says whether the cluster is up
# Exit codes: 0 done / up; 1 failed (start: the tail of the daemons' logs is shown); 2 usage error or not root /
# Slurm or munge missing (`bash scripts/install.sh --test` installs slurm-wlm and munge); 3 (status) not up.
# Environment: MGPO_SLURMCTLD_PORT / MGPO_SLURMD_PORT (6817 / 6818: give a second cluster on the same machine its
# own ports), MGPO_SLURM_START_TIMEOUT (60 s).
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin  # the daemons live in /usr/sbin, not always on a user's PATH

cmd=${1:-}
state=$(realpath -m "${2:-/tmp/mgpo-slurm}")
ctld_port=${MGPO_SLURMCTLD_PORT:-6817}
slurmd_port=${MGPO_SLURMD_PORT:-6818}
start_timeout=${MGPO_SLURM_START_TIMEOUT:-60}
conf=$state/slurm.conf
socket=$state/munge/munge.socket.2
node=$(hostname -s)
export SLURM_CONF=$conf

say() { echo "slurm-local: $*" >&2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

# pid of a daemon from its pid file, if that process is alive and is that daemon (not a recycled pid)
daemon_pid() {  # name pidfile
  local pid
  pid=$(cat "$2" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] && echo "$pid"
}
running() {  # the daemons that run, as "name:pid" words
  local out=()
  local pid
  pid=$(daemon_pid munged "$state/run/munged.pid") && out+=("munged:$pid")
  pid=$(daemon_pid slurmctld "$state/run/slurmctld.pid") && out+=("slurmctld:$pid")
  pid=$(daemon_pid slurmd "$state/run/slurmd.pid") && out+=("slurmd:$pid")
  echo "${out[*]:-}"
}
node_state() { sinfo -h -n "$node" -o %T 2>/dev/null | head -n1 || true; }
# up: idle, mixed, allocated or completing, and responding (sinfo adds a '*' to a node whose slurmd does not answer)
node_up() { [[ $1 =~ ^(idle|mixed|allocated|completing)$ ]]; }
# whether the node's slurmd registered with slurmctld at or after epoch second $1 (right after a restart, sinfo
# shows the node as it was saved, before its slurmd has spoken)
registered_since() {
  local t
  t=$(scontrol show node "$node" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2) || return 1
  [[ -n $t && $t != None ]] && (($(date -d "$t" +%s 2>/dev/null || echo 0) >= $1))
}

show_logs() {
  local f
  for f in "$state"/log/munged.log "$state"/log/slurmctld.log "$state"/log/slurmd.log; do
    [[ -s $f ]] || continue
    echo "---- tail of $f" >&2
    tail -n 15 "$f" >&2
  done
}

write_conf() {
  local cpus mem_total margin
  cpus=$(nproc)
  mem_total=$(free -m | awk '/^Mem:/ {print $2}')
  margin=$(( mem_total / 20 > 256 ? mem_total / 20 : 256 ))  # 5 %, at least 256 MiB: what slurmd may not see
  cat >"$conf" <<EOF
# Written by scripts/slurm-local.sh: a one-node cluster on $node, state under $state.
ClusterName=mgpo-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits cred_expire + 1 s before it may start again (default 120 s)
AuthInfo=socket=$socket,cred_expire=10
StateSaveLocation=$state/spool/slurmctld
SlurmdSpoolDir=$state/spool/slurmd
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
# no systemd, no cgroups, no accounting daemon: sacct does not work here
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# start a submitted job at once (not up to 3 s later); look at pending jobs (e.g. a requeued one whose wait is
# over) every 5-10 s, not every 30-60 s
SchedulerParameters=batch_sched_delay=0,sched_interval=10,bf_interval=5
# CR_CPU (memory not consumable): one-CPU jobs share the node, one per CPU
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# use the CPUs and memory written here rather than what slurmd detects
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
MinJobAge=60
KillWait=5
OverTimeLimit=0
InactiveLimit=0
Waittime=0
SlurmctldTimeout=10
SlurmdTimeout=10
NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$node CPUs=$cpus RealMemory=$(( mem_total - margin )) State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  local up missing=()
  [[ $(id -u) == 0 ]] || { say "start needs root (the daemons run as root)"; exit 2; }
  for b in munged slurmctld slurmd sinfo scontrol; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
  if ((${#missing[@]})); then
    say "missing ${missing[*]}: run bash scripts/install.sh --test as root (it installs slurm-wlm and munge)"
    exit 2
  fi
  up=$(running)
  if [[ $(wc -w <<<"$up") == 3 ]] && node_up "$(node_state)"; then
    say "already running ($up), state in $state"
    echo "export SLURM_CONF=$conf"
    return 0
  fi
  [[ -n $up ]] && { say "partly running ($up): restarting"; stop_daemons; }

  mkdir -p "$state"/{munge,run,log,spool/slurmctld,spool/slurmd}
  chmod 755 "$state/munge"  # munged wants its socket directory reachable by all
  if [[ ! -s $state/munge/munge.key ]]; then
    mungekey --create --keyfile="$state/munge/munge.key" 2>/dev/null \
      || dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 600 "$state/munge/munge.key"
  write_conf
  echo "export SLURM_CONF=$conf" >"$state/env"

  munged --force --key-file="$state/munge/munge.key" --socket="$socket" --pid-file="$state/run/munged.pid" \
    --log-file="$state/log/munged.log" --seed-file="$state/munge/munged.seed" \
    || { say "munged did not start"; show_logs; exit 1; }
  slurmctld -f "$conf" || { say "slurmctld did not start"; show_logs; stop_daemons; exit 1; }
  local launched
  launched=$(date +%s)
  slurmd -f "$conf" || { say "slurmd did not start"; show_logs; stop_daemons; exit 1; }

  local deadline=$((SECONDS + start_timeout)) st=""
  while ((SECONDS < deadline)); do
    st=$(node_state)
    node_up "$st" && registered_since "$launched" && break
    case $st in
      down*|drain*) scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;  # left down by a past run
    esac
    if [[ $(wc -w <<<"$(running)") != 3 ]]; then
      say "a daemon exited (running: $(running))"; show_logs; stop_daemons; exit 1
    fi
    sleep 1
  done
  if ! node_up "$st" || ! registered_since "$launched"; then
    say "node $node not up after ${start_timeout}s (sinfo says: '${st:-nothing}'; its slurmd registered: $(
      registered_since "$launched" && echo yes || echo no))"; show_logs; stop_daemons; exit 1
  fi
  say "up: node $node ($st, $(nproc) CPUs), partition debug, state in $state"
  echo "export SLURM_CONF=$conf"
}

stop_daemons() {  # slurmd and slurmctld (each takes ~2 s to go), then munged; SIGTERM, then SIGKILL after 20 s
  local group name pid pids i alive
  for group in "slurmd slurmctld" munged; do
    pids=()
    for name in $group; do
      pid=$(daemon_pid "$name" "$state/run/$name.pid") || continue
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$name:$pid")
    done
    for ((i = 0; i < 200; i++)); do
      alive=0
      for pid in "${pids[@]}"; do [[ -d /proc/${pid#*:} ]] && alive=1; done
      ((alive)) || break
      sleep 0.1
    done
    for pid in "${pids[@]}"; do
      [[ -d /proc/${pid#*:} ]] || continue
      say "${pid%:*} (${pid#*:}) ignored SIGTERM for 20 s: killing it"
      kill -KILL "${pid#*:}" 2>/dev/null || true
      sleep 0.5
      [[ ! -d /proc/${pid#*:} ]] || { say "could not stop ${pid%:*} (${pid#*:})"; return 1; }
    done
  done
}

stop() {
  local up jobs i
  up=$(running)
  if [[ -z $up ]]; then say "not running (state in $state)"; return 0; fi
  # the jobs' processes do not belong to the daemons: cancel them, or they would outlive the cluster
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  if [[ -n $jobs ]]; then
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
      [[ -z $(squeue -h -t PD,R,CG,S,CF -o %i 2>/dev/null) ]] && break
      sleep 0.5
    done
  fi
  stop_daemons || exit 1
  say "stopped ($up)"
}

status() {
  local up st
  up=$(running)
  st=""
  [[ $(wc -w <<<"$up") == 3 ]] && st=$(node_state)  # (sinfo takes ~10 s to give up on a slurmctld that is not there)
  if [[ -n $st ]]; then
    echo "up: $up; node $node $st; SLURM_CONF=$conf"
    return 0
  fi
  echo "down${up:+ (only $up running)}; state dir $state"
  return 3
}

case $cmd in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
