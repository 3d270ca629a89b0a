#!/usr/bin/env bash
# ImageNet ResNet-50 under Open MPI: one process per node, 8 GPUs each.
#
#   launch/openmpi.sh hosts.txt --workdir /shared/runs/rn50_8k --data imagenet --batch-size 8192
#
# hosts.txt lists one node per line (Open MPI's hostfile). jax.distributed.initialize
# reads OMPI_COMM_WORLD_* (no coordinator flags needed). The workdir must be
# shared by every node.
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: $0 HOSTFILE [flags of experiments/imagenet_resnet50.py]" >&2
  exit 2
fi
hostfile="$1"; shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/xla_gpu_flags.sh
. "$here/xla_gpu_flags.sh"
nodes=$(grep -cve '^\s*$' -e '^\s*#' "$hostfile")
exec mpirun -np "$nodes" --hostfile "$hostfile" --map-by ppr:1:node --bind-to none \
  -x XLA_FLAGS -x XLA_PYTHON_CLIENT_MEM_FRACTION -x PATH -x LD_LIBRARY_PATH \
  python "$here/../experiments/imagenet_resnet50.py" "$@"
