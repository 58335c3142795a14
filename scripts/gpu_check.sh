#!/usr/bin/env bash
# GPU checks, most important first, sized for a lent GPU machine as it is: its own Python, torch and
# transformers, run from the repository root with nothing installed (PYTHONPATH points here), about 7 minutes.
#   1. GPT-2 124M bf16 at sequence 1024: MFU against the datasheet dense peak, eager and compiled
#      (scripts/gpu_mfu.toml) -> <gpu>-mfu
#   2. the precision x optimizer grid on one GPU (scripts/gpu_grid.toml)               -> <gpu>
#   3. the 2-rank layouts, where there are 2+ GPUs; 4. the peers matrix, while time is left
# Each run directory is packed into one archive $OUT/<name>.tar.gz (only a few files come back from $OUT);
# unpack them into results/reference/. GPU_CHECK_DRY_RUN=1 runs the same commands on the CPU with the tiny
# matrices below (a test does this), so the script is exercised where no GPU is.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-results/runs/gpu-check}
mkdir -p "$out"
work=$(mktemp -d)
start=$SECONDS
budget=${GPU_CHECK_SECONDS:-420}
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  device=cpu; gpu=dryrun; mfu=${GPU_CHECK_MFU_MATRIX:?}; grid=${GPU_CHECK_GRID_MATRIX:?}; ngpu=0
  peers=${GPU_CHECK_PEERS_MATRIX:-smoke}
else
  device=cuda; mfu=scripts/gpu_mfu.toml; grid=scripts/gpu_grid.toml; peers=peers
  gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
  ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
fi
python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"

pack() {  # pack one run directory (without per-config logs and metrics) into $out/<name>.tar.gz
  tar -czf "$out/$1.tar.gz" -C "$work" --exclude "$1/logs" --exclude "$1/metrics" "$1" && echo "packed $out/$1.tar.gz"
}
left() { [ $((SECONDS - start)) -lt "$budget" ]; }

python3 -m bench.run --matrix "$mfu" --device "$device" --out "$work/$gpu-mfu" --timeout 300
pack "$gpu-mfu"
grep -A4 "^| config_id" "$work/$gpu-mfu/report.md"
if left; then
  python3 -m bench.run --matrix "$grid" --device "$device" --out "$work/$gpu" --timeout 120
  pack "$gpu"
fi
if left && [ "$ngpu" -ge 2 ]; then
  mkdir -p "$work/$gpu-layouts"
  for layout in "--dp 2" "--dp 2 --dp-mode fsdp" "--tp 2" "--pp 2"; do
    name=$(echo "$layout" | tr -d ' -')
    python3 -m llmopt.train --device cuda $layout --steps 10 --quiet --metrics-out "$work/$gpu-layouts/$name.json" \
      && echo "ok $layout" || echo "FAILED $layout"
  done
  pack "$gpu-layouts"
fi
if left; then
  python3 -m bench.run --matrix "$peers" --device "$device" --out "$work/$gpu-peers" --timeout 120
  pack "$gpu-peers"
fi
echo "gpu_check: $((SECONDS - start)) s; archives in $out"
