#!/usr/bin/env bash
# N processes of `python -m pfc_jax.main` on this machine, each with K fake CPU devices:
# a multi-process run (jax.distributed, gloo collectives between processes) without a
# cluster. This is how the multi-process path is tested; it also reproduces a multi-host
# problem on a laptop.
#
#   launch/local_multiprocess.sh N K --config configs/synthetic.py --workdir /tmp/pfc_mp [--config.x=y ...]
#
# The mesh has N*K devices, as one process with N*K devices would (same batches, same
# sharding, same results up to floating-point reduction order). Process 0 writes to
# the terminal; process i > 0 to $PFC_LOG_DIR/process_<i>.log (default: a new temporary
# directory, printed at start). Ctrl-C or SIGTERM is passed to every process (they save a
# checkpoint at a common step and exit). The exit status is the first failure's, else 0.
#
# Environment: PYTHON (default: python), PFC_PORT (coordinator port; default: a free one),
# PFC_LOG_DIR. The repository root is put on PYTHONPATH.
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ || ! "$2" =~ ^[1-9][0-9]*$ ]]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
nproc=$1
ndev=$2
shift 2

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
port=${PFC_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logs=${PFC_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/pfc_local_mp.XXXXXX")}
mkdir -p "$logs"
if [[ $nproc -gt 1 ]]; then
  echo "local_multiprocess: $nproc processes x $ndev CPU devices, coordinator 127.0.0.1:$port, logs of processes 1..$((nproc - 1)) in $logs" >&2
fi

pids=()
stop() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap stop INT TERM

for ((i = 0; i < nproc; i++)); do
  cmd=(env JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$ndev"
       PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
       "$python" -m pfc_jax.main "$@"
       --coordinator="127.0.0.1:$port" --num_processes="$nproc" --process_id="$i")
  if [[ $i -eq 0 ]]; then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$logs/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

# Wait for all; the first failure stops the others (they would otherwise wait for it
# at the next collective until JAX's heartbeat timeout). Polled, so that a signal to
# this script is forwarded at once.
status=0
finished=0
declare -A reaped=()
while [[ $finished -lt $nproc ]]; do
  for i in "${!pids[@]}"; do
    [[ -n "${reaped[$i]:-}" ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    reaped[$i]=1
    finished=$((finished + 1))
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
      status=$rc
      echo "local_multiprocess: process $i exited with status $rc; stopping the others (logs in $logs)" >&2
      stop
    fi
  done
  sleep 0.2
done
exit $status
