#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice (several hosts): the same command on every worker.
#
#   launch/tpu_vm.sh setup NAME ZONE     # copy this repository (its git-tracked files) to every worker,
#                                        # install JAX for TPU and pfc_jax there
#   launch/tpu_vm.sh run NAME ZONE --config configs/glint360k_r100.py --workdir /mnt/shared/r100 \
#       --config.data.path=/mnt/shared/glint360k
#   launch/tpu_vm.sh logs NAME ZONE      # follow worker 0's output (it alone logs)
#   launch/tpu_vm.sh stop NAME ZONE      # SIGTERM on every worker: save a checkpoint, exit
#
# NAME and ZONE are the TPU VM's (gcloud compute tpus tpu-vm create NAME --zone ZONE
# --accelerator-type v4-32 --version <a TPU VM base image>). `run` starts one process per
# worker (host) in the background via `gcloud compute tpus tpu-vm ssh --worker=all`, each
# owning that host's TPU chips; pfc_jax.main finds the TPU runtime and calls
# `jax.distributed.initialize()`, which reads the worker count and this worker's id from the
# TPU metadata. No coordinator flags are needed. Running the same `run` again resumes.
#
# Requirements: --workdir on a file system every worker mounts at the same path (e.g. a
# Filestore NFS share): Orbax writes each worker's shards of the checkpoint there, worker 0
# the metadata, config.json, metrics.jsonl and TensorBoard files. The dataset readable
# from every worker. The global batch a multiple of the total chip (device) count.
#
# Environment: PFC_REMOTE_DIR (where the repository goes on the workers; default
# pfc_jax, in the home directory), PFC_PYTHON (default python3), PFC_JAX (the JAX
# requirement, default "jax[tpu]").
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 3 ]] || usage
action=$1 name=$2 zone=$3
shift 3
remote=${PFC_REMOTE_DIR:-pfc_jax}
python=${PFC_PYTHON:-python3}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

on_all() {  # run a shell command on every worker
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}

case $action in
  setup)
    tarball=$(mktemp "${TMPDIR:-/tmp}/pfc_jax.XXXXXX.tar.gz")
    (cd "$root" && git ls-files -z | xargs -0 tar czf "$tarball")
    gcloud compute tpus tpu-vm scp "$tarball" "$name:pfc_jax.tar.gz" --zone "$zone" --worker=all
    rm -f "$tarball"
    on_all "mkdir -p $remote && tar xzf pfc_jax.tar.gz -C $remote && cd $remote && \
      $python -m pip install -q -U '${PFC_JAX:-jax[tpu]}' && $python -m pip install -q -e . && \
      $python -c 'import jax, pfc_jax; print(\"jax\", jax.__version__, \"pfc_jax\", pfc_jax.__version__)'"
    ;;
  run)
    [[ $# -gt 0 ]] || usage
    args=$(printf '%q ' "$@")
    # nohup + background: the run survives the ssh session; each worker keeps its pid
    # for `stop` and its output in ~/pfc_jax.log.
    on_all "cd $remote && nohup $python -m pfc_jax.main $args > ~/pfc_jax.log 2>&1 < /dev/null & echo \$! > ~/pfc_jax.pid"
    echo "started on every worker of $name; follow it with: $0 logs $name $zone" >&2
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=0 --command "tail -n 50 -f ~/pfc_jax.log"
    ;;
  stop)
    # The processes agree on a step, save a checkpoint there and exit.
    on_all "[ -f ~/pfc_jax.pid ] && kill -TERM \$(cat ~/pfc_jax.pid) 2>/dev/null || true"
    ;;
  *)
    usage
    ;;
esac
