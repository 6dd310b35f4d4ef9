# Sourced by the sbatch scripts of slurm/: preemption handling and the run of one step per node.
# The scripts set the USR1 trap as their first command (SLURM may send the warning ~30 s early);
# this file defines what happens next.
#
# Preemption: `#SBATCH --signal=B:USR1@120` makes SLURM signal the BATCH SHELL 120 s before the time
# limit (`scancel --batch --signal=USR1 JOBID` does the same by hand; plain `scancel --signal` reaches only
# the steps). The trap forwards USR1 to the job's steps (scancel --signal=USR1), where `ortho-lora launch`
# passes it to every training rank; the ranks agree at the next step boundary, write one checkpoint and
# exit 0. The script then requeues the job (scontrol requeue); the requeued job runs with --resume and
# continues from the latest complete checkpoint (a job that had already finished exits at once).

forward_preemption() {
  echo "[ortho-lora] $(date -Is) preemption warning (USR1): asking the ranks to checkpoint and stop"
  if [ -n "${STEP_PID:-}" ]; then
    scancel --signal=USR1 "$SLURM_JOB_ID" || true
  fi
}

# run_step CMD...: srun one task per node running CMD; returns CMD's status, requeues if preempted.
run_step() {
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL "$@" &
  STEP_PID=$!
  if [ "${PREEMPTED:-0}" = 1 ]; then forward_preemption; fi   # the warning came before srun started
  local rc=0
  while true; do
    wait "$STEP_PID" && rc=0 || rc=$?
    kill -0 "$STEP_PID" 2>/dev/null || break   # wait returned early because a trapped signal arrived
  done
  if [ "${PREEMPTED:-0}" = 1 ] && [ "$rc" = 0 ]; then
    echo "[ortho-lora] $(date -Is) checkpoint written; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$rc"
}

# NCCL on real clusters (set what your site needs, e.g. in ~/.bashrc or before sbatch):
#   NCCL_SOCKET_IFNAME=ib0 (or eth0)  the interface for bootstrap / socket traffic
#   NCCL_IB_HCA=mlx5                  InfiniBand adapters to use; NCCL_IB_DISABLE=1 without IB
#   NCCL_DEBUG=WARN                   INFO when diagnosing
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1 a failed collective aborts instead of hanging
#   ORTHO_LORA_TIMEOUT_S=1800         process-group timeout: a dead rank ends the job within this time
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# CPU threads per rank: the CPUs SLURM gave this node's task (--cpus-per-task; else what this shell may use),
# shared by the node's ranks (NPROC_PER_NODE, else one per GPU), at least 1. Data preparation runs once per job
# (distributed.data_cache), so the ranks need no extra CPUs for it.
_ortho_cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
_ortho_ranks=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( _ortho_cpus / _ortho_ranks > 0 ? _ortho_cpus / _ortho_ranks : 1 ))}
