#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for tests and CI (Debian's slurm-wlm 22.05 + munge).
#   bash slurm/local_cluster.sh install   # apt-get the packages (root)
#   bash slurm/local_cluster.sh start DIR # write slurm.conf under DIR, start munged, slurmctld, slurmd n1 and n2
#   bash slurm/local_cluster.sh stop DIR  # cancel jobs, stop the daemons by PID, drop the /etc/hosts line
# After start, use SLURM_CONF=DIR/slurm.conf with sbatch/squeue/scontrol.
set -euo pipefail
cmd=${1:?install|start|stop}
dir=${2:-/tmp/ortho-lora-slurm}
HOSTS_LINE="127.0.0.1 n1 n2 # ortho-lora-local-cluster"

case "$cmd" in
install)
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  fi
  ;;
start)
  mkdir -p "$dir"/{state,spool/n1,spool/n2,log}
  cat > "$dir/slurm.conf" <<CONF
ClusterName=ortholocal
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
KillWait=30
MinJobAge=300
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001 CPUs=2 RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17002 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  grep -q "ortho-lora-local-cluster" /etc/hosts || echo "$HOSTS_LINE" >> /etc/hosts
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged" || munged --force
  slurmctld -f "$dir/slurm.conf"
  slurmd -f "$dir/slurm.conf" -N n1
  slurmd -f "$dir/slurm.conf" -N n2
  for _ in $(seq 1 60); do
    if SLURM_CONF="$dir/slurm.conf" sinfo -h -o "%T" 2>/dev/null | grep -qx idle; then
      [ "$(SLURM_CONF="$dir/slurm.conf" sinfo -h -N -o "%T" | grep -c idle)" = 2 ] && exit 0
    fi
    sleep 0.5
  done
  echo "local SLURM cluster did not come up; see $dir/log" >&2
  exit 1
  ;;
stop)
  export SLURM_CONF="$dir/slurm.conf"
  [ -f "$SLURM_CONF" ] && scancel --full --user="$(id -un)" 2>/dev/null || true
  for pidfile in "$dir"/slurmd-n1.pid "$dir"/slurmd-n2.pid "$dir"/slurmctld.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 1
  pkill -f "slurmstepd" 2>/dev/null || true
  sed -i "/ortho-lora-local-cluster/d" /etc/hosts 2>/dev/null || true
  ;;
*)
  echo "usage: $0 install|start|stop [DIR]" >&2
  exit 2
  ;;
esac
