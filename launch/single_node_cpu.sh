#!/usr/bin/env bash
# One node, NPROC CPU worker processes talking over gloo.
#   launch/single_node_cpu.sh configs/demo.yaml [--set section.key=value ...]
set -euo pipefail

NPROC=${NPROC:-2}

exec torchrun --max-restarts="${MAX_RESTARTS:-0}" --signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --standalone --nnodes=1 --nproc_per_node="$NPROC" \
    -m disttrain train "$@" --set train.device=cpu
