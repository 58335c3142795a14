#!/usr/bin/env bash
# A sweep on a SLURM cluster: run this on a login node, from a checkout on a filesystem every node mounts
# (the configs' metrics come back through the sweep directory). Each config becomes one SLURM job; bench.run
# stays on the login node (in tmux/screen: it polls the jobs and writes the rows), and --resume after a
# disconnect or a kill picks up where it was, cancelling nothing that finished.
#
#   bash scripts/slurm_sweep.sh results/runs/cluster-grid
#
# Settings from the environment (defaults in brackets): PARTITION [gpu], ACCOUNT [none], GPUS_PER_NODE [8],
# TIMEOUT seconds per config [1800], MATRIX [scripts/gpu_grid.toml], DEVICE [cuda], SHARE=1 to let configs'
# jobs share nodes (default: each job has its nodes to itself). Or put them in the matrix TOML's [slurm] table:
#   [slurm]
#   partition = "gpu"
#   account = "my-project"
#   gpus_per_node = 8
#   options = { constraint = "h100", qos = "normal" }
set -euo pipefail
out=${1:-results/runs/slurm-$(date -u +%Y%m%dT%H%M%SZ)}
matrix=${MATRIX:-scripts/gpu_grid.toml}
# how the configs run (given again on --resume: they are not part of the saved plan)
how=(--executor slurm --jobs auto --slurm-partition "${PARTITION:-gpu}" --gpus-per-node "${GPUS_PER_NODE:-8}"
     --timeout "${TIMEOUT:-1800}")
if [[ -n "${ACCOUNT:-}" ]]; then how+=(--slurm-account "$ACCOUNT"); fi
if [[ -n "${SHARE:-}" ]]; then how+=(--slurm-share); fi
if [[ -f "$out/plan.json" ]]; then
  python -m bench.run --resume --out "$out" "${how[@]}"
else
  python -m bench.run --matrix "$matrix" --device "${DEVICE:-cuda}" --out "$out" "${how[@]}"
fi
# Ctrl-C cancels the running jobs (scancel through submitit) and keeps the finished rows; squeue -u "$USER"
# shows what is queued, and each config's log (results/.../logs/<config_id>.log) names its SLURM job id.
