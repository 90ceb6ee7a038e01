#!/usr/bin/env bash
# One torchrun agent per node; run this same command on every node. The agents meet at RDZV_ENDPOINT
# (c10d rendezvous: the first agent that reaches it on that host serves the store) and agree on ranks.
#   RDZV_ENDPOINT=node0:29500 NNODES=2 launch/multi_node.sh configs/demo.yaml [--set ...]
# NPROC_PER_NODE: worker processes per node ("gpu": one per GPU; a number for CPU workers).
# When a node's hostname does not resolve to its address on the cluster network: LOCAL_ADDR=<that address>
# (workers reach rank 0's store there), and RDZV_CONF=is_host=1 on the node that owns RDZV_ENDPOINT.
# GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME pick the network interface, when a node has several.
# MAX_RESTARTS=R: restart the workers up to R times after a failure; they continue from the newest checkpoint.
# Elastic membership (NNODES=1:4): also TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store per rendezvous round).
# Signals: the agent forwards SIGTERM, SIGINT and SIGUSR1 to the workers, which stop at a step they agree on with a
# checkpoint there (continue with --resume); torchrun itself then ends with its own traceback.
set -euo pipefail


NNODES=${NNODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-gpu}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:29500}
RDZV_ID=${RDZV_ID:-disttrain}
RDZV_CONF=${RDZV_CONF:-}
LOCAL_ADDR=${LOCAL_ADDR:-}

exec torchrun --max-restarts="${MAX_RESTARTS:-0}" --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID" --rdzv_conf="$RDZV_CONF" \
    --local_addr="$LOCAL_ADDR" --signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    -m disttrain train "$@"
