#!/bin/bash
# Multi-node training with torchrun, without a scheduler: run this script on every node, from
# the repository root, with the same settings except NODE_RANK.
#
#   node0$ NODE_RANK=0 MASTER_ADDR=node0 bash configs/cluster/torchrun_multinode.sh
#   node1$ NODE_RANK=1 MASTER_ADDR=node0 bash configs/cluster/torchrun_multinode.sh
#
# Extra arguments go to `llm-lightning fit` and win over the configs:
#   NODE_RANK=0 bash configs/cluster/torchrun_multinode.sh --trainer.max_steps 500
#
# torchrun starts NPROC_PER_NODE processes here and meets the other nodes at MASTER_ADDR:MASTER_PORT
# (c10d rendezvous, hosted by node 0); Lightning takes ranks and world size from torchrun.
# Prepare the data once, before, on one machine (`llm-lightning prepare`), into DATA_DIR.
# Running it again after a crash resumes from RUN_DIR/checkpoints/last.ckpt.

set -euo pipefail

# ---- edit: paths must be on shared storage, the same on every node ----------------------------
NNODES=${NNODES:-2}                                       # machines in the run
NPROC_PER_NODE=${NPROC_PER_NODE:-8}                       # GPUs per machine, one process each
NODE_RANK=${NODE_RANK:?set NODE_RANK: 0 on the MASTER_ADDR machine, 1 .. NNODES-1 on the others}
MASTER_ADDR=${MASTER_ADDR:-node0}                         # node 0's address, reachable by all nodes
MASTER_PORT=${MASTER_PORT:-29500}                         # a free TCP port on node 0
RUN_ID=${RUN_ID:-llm-lightning}                           # the same on every node of one run
CONFIG=${CONFIG:-configs/medium.yaml}
STRATEGY=${STRATEGY:-configs/strategy/ddp_multinode.yaml} # or configs/strategy/fsdp.yaml
DATA_DIR=${DATA_DIR:-$PWD/processed_data}
RUN_DIR=${RUN_DIR:-$PWD/runs/$RUN_ID}
# ------------------------------------------------------------------------------------------------

# Node 0 hosts the rendezvous store; the others connect to it. (With the c10d backend torchrun
# numbers the nodes itself, so NODE_RANK only decides who hosts.)
if [ "$NODE_RANK" = 0 ]; then IS_HOST=1; else IS_HOST=0; fi

exec torchrun \
    --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RUN_ID" \
    --rdzv_conf "is_host=$IS_HOST" \
    -m llm_lightning fit \
    --config "$CONFIG" --config "$STRATEGY" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" \
    --trainer.default_root_dir "$RUN_DIR" \
    --data.data_dir "$DATA_DIR" \
    --checkpoint.dirpath "$RUN_DIR/checkpoints" \
    --ckpt_path last \
    "$@"
