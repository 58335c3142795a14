#!/usr/bin/env bash
# Multi-node llmopt with torchrun: run this same script on every node.
#   NNODES=2 NPROC_PER_NODE=8 MASTER_ADDR=node0.example MASTER_PORT=29500 scripts/torchrun_multinode.sh \
#       --preset gpt2 --dp 4 --tp 4 --seq-len 1024 --precision bf16
# dp x tp x pp must equal NNODES x NPROC_PER_NODE; llmopt refuses a mismatch with one line.
# Keep --tp within a node (the mesh puts TP ranks adjacent), span nodes with --dp or --pp.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NPROC_PER_NODE:?set NPROC_PER_NODE}" "${MASTER_ADDR:?set MASTER_ADDR}"
exec torchrun \
  --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RDZV_ID:-llmopt}" \
  -m llmopt.train "$@"
