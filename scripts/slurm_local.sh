#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for `reproduce submit --cluster slurm` and its test
# (tests/test_submit_slurm.py, docs/cluster.md).
#
#   bash scripts/slurm_local.sh start     install slurm-wlm + munge with apt-get if absent (root), write a
#                                         one-node slurm.conf, start munged, slurmctld, slurmd; wait for
#                                         `sinfo` to show the node idle
#   bash scripts/slurm_local.sh status    the node's state (exit 1 when the cluster is down)
#   bash scripts/slurm_local.sh stop      stop the daemons it started and remove the config it wrote
#
# The node: this host, its CPUs (at most CPUS, default 2), no GPUs; proctrack/linuxproc and task/none
# (no cgroups: containers often have none writable), select/cons_tres by CPU, KillWait 2 s (a requeued
# or cancelled job is killed 2 s after its SIGTERM), no accounting database (so `sacct` has nothing;
# `reproduce jobs` asks squeue and reads the job's own files). State and logs: STATE (default
# /tmp/reproduce-slurm). A slurm.conf this script did not write is never touched: it refuses to start.
set -euo pipefail

STATE=${STATE:-/tmp/reproduce-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by reproduce's scripts/slurm_local.sh"
HOST=$(hostname -s)

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and this is not root: apt-get install slurm-wlm munge"
  echo "installing slurm-wlm and munge (apt-get) ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: use that cluster (or move it away)"
  fi
  local cpus memory
  cpus=$(nproc); cpus=$(( cpus < ${CPUS:-2} ? cpus : ${CPUS:-2} ))
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
  mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
  cat >"$CONF" <<EOF
$MARK ($(date -u +%FT%TZ)): a one-node cluster on this machine
ClusterName=reproduce
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=2
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return  # a munged already answers
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  [ -f /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged
  cp /run/munge/munged.pid "$STATE/munged.pid"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  die "munged did not answer (see /var/log/munge/munged.log)"
}

start() {
  install
  if [ "$(node_state)" = idle ] || [ "$(node_state)" = mixed ] || [ "$(node_state)" = allocated ]; then
    echo "slurm is already up: $(sinfo -h -o '%P %a %D %T' | head -1)"
    return
  fi
  write_conf
  start_munge
  /usr/sbin/slurmctld -c || die "slurmctld did not start (see $STATE/slurmctld.log)"
  /usr/sbin/slurmd -c || die "slurmd did not start (see $STATE/slurmd.log)"
  for _ in $(seq 150); do
    if [ "$(node_state)" = idle ]; then
      echo "slurm is up: node $HOST idle ($(sinfo -h -o '%c CPUs, partition %P')), state in $STATE"
      return
    fi
    sleep 0.2
  done
  tail -5 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
  die "node $HOST is not idle after 30 s (sinfo: $(node_state || echo no answer))"
}

stop_pid() {  # stop_pid NAME PIDFILE: the daemon this script started, by its pid
  local pid
  [ -f "$2" ] || return 0
  pid=$(cat "$2")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "stopped $1 ($pid)"
  fi
  rm -f "$2"
}

stop() {
  stop_pid slurmd "$STATE/slurmd.pid"
  stop_pid slurmctld "$STATE/slurmctld.pid"
  stop_pid munged "$STATE/munged.pid"
  if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then
    rm -f "$CONF"
  fi
  rm -rf "$STATE"
}

status() {
  local state
  state=$(node_state)
  if [ -z "$state" ]; then
    echo "slurm is down (no answer from sinfo)"
    exit 1
  fi
  echo "node $HOST: $state"
  squeue -h -o '%i %j %T %M' | sed 's/^/job /'
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
