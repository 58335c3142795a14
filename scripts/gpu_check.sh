#!/usr/bin/env bash
# GPU checks for a machine with CUDA (see issue notes), most important first: GPT-2 124M bf16 at sequence 1024
# and its MFU (a reference run under results/reference/<gpu>-mfu/), every precision x optimizer on one GPU, the
# multi-rank layouts on as many GPUs as there are, then the peers matrix. One metrics JSON per single run in
# ${OUT:-results/runs/gpu-check}.
set -uo pipefail
out=${OUT:-results/runs/gpu-check}; mkdir -p "$out"
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
python3 -m bench.run --matrix scripts/gpu_mfu.toml --device cuda --out "results/reference/$gpu-mfu" --timeout 900 \
  && grep -A4 "^| config_id" "results/reference/$gpu-mfu/report.md"
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
for precision in fp32 bf16 fp16; do
  for optimizer in sgd adam adamw lamb; do
    python3 -m llmopt.train --device cuda --precision "$precision" --optimizer "$optimizer" --steps 10 --quiet \
      --metrics-out "$out/1gpu-$precision-$optimizer.json" && echo "ok 1gpu $precision $optimizer" || echo "FAILED 1gpu $precision $optimizer"
  done
done
if [ "$ngpu" -ge 2 ]; then
  for layout in "--dp 2" "--dp 2 --dp-mode fsdp" "--tp 2" "--pp 2"; do
    python3 -m llmopt.train --device cuda $layout --steps 10 --quiet --metrics-out "$out/$(echo $layout | tr -d ' -').json" \
      && echo "ok $layout" || echo "FAILED $layout"
  done
fi
python3 -m bench.run --matrix peers --device cuda --out "results/reference/$gpu-peers"
