#!/usr/bin/env bash
# N processes on this machine, talking over 127.0.0.1 with Gloo, each with D fake
# CPU devices: the multi-host code path without a cluster.
#
#   launch/local.sh 2 2 --workdir /tmp/run --data synthetic --model resnet20 ...
#
# Each process is told that N processes share this host (LOCAL_WORLD_SIZE, as torchrun
# does), which --decode-workers and the /dev/shm check read.
# SIGTERM/SIGINT are forwarded to every process (they checkpoint and exit 0).
# On one machine a dead process is noticed after 10 s, not JAX's default 100 s; set
# LSGD_HEARTBEAT_TIMEOUT and LSGD_SHUTDOWN_TIMEOUT (seconds) to change them.
# If one process fails, the others are stopped and the exit status is the failure's.
set -uo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]] || ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [flags of experiments/imagenet_resnet50.py]" >&2
  exit 2
fi
n="$1"; devices="$2"; shift 2
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
port="${LSGD_COORDINATOR_PORT:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

pids=()
stop() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; }
trap 'stop' TERM INT
for ((i = 0; i < n; i++)); do
  LOCAL_WORLD_SIZE="$n" "$python" "$here/../experiments/imagenet_resnet50.py" "$@" \
    --coordinator-address "127.0.0.1:$port" --num-processes "$n" --process-id "$i" \
    --cpu-devices "$devices" --heartbeat-timeout "${LSGD_HEARTBEAT_TIMEOUT:-10}" \
    --shutdown-timeout "${LSGD_SHUTDOWN_TIMEOUT:-30}" &
  pids+=($!)
done

status=0
remaining=$n
while [ "$remaining" -gt 0 ]; do
  wait -n -p done_pid
  rc=$?
  # wait -n returns >128 when interrupted by a trapped signal: keep waiting.
  if [ -z "${done_pid:-}" ]; then continue; fi
  remaining=$((remaining - 1))
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    echo "local.sh: process with pid $done_pid exited with status $rc; stopping the others" >&2
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
  fi
  unset done_pid
done
exit "$status"
