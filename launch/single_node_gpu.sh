#!/usr/bin/env bash
# One node, one worker process per visible GPU, NCCL between them.
#   launch/single_node_gpu.sh configs/demo.yaml [--set section.key=value ...]
# CUDA_VISIBLE_DEVICES=0,1 restricts the GPUs; NPROC_PER_NODE=2 uses the first two.
set -euo pipefail

NPROC_PER_NODE=${NPROC_PER_NODE:-gpu}

exec torchrun --max-restarts="${MAX_RESTARTS:-0}" --signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --standalone --nnodes=1 --nproc_per_node="$NPROC_PER_NODE" \
    -m disttrain train "$@" --set train.device=cuda
