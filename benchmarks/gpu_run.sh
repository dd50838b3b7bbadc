#!/usr/bin/env bash
# Every GPU figure the open issues ask for, in one call on the device machine (Python 3.12 with
# torch, torchvision, transformers, timm, pyarrow, pillow; no network, no Ray). The packages it
# lacks travel as wheels in .whl/ (see benchmarks/README.md); this repo is put on PYTHONPATH as
# the `ssam` package through a folder of links (no install step).
#   bash benchmarks/gpu_run.sh OUTDIR
set -uo pipefail
OUT=${1:-/tmp/gpu-out}
mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/.." && pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg/ssam
cp "$REPO"/ssam/*.py /tmp/pkg/ssam/ && cp -r "$REPO"/ssam/vocab /tmp/pkg/ssam/
for sub in model stages pipeline; do ln -sfn "$REPO/$sub" /tmp/pkg/ssam/$sub; done
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 SSAM_OFFLINE=1 HF_HUB_OFFLINE=1
cd /tmp  # the repo's own ssam/ folder would shadow the package put together in /tmp/pkg
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, ssam.model.amg, ssam.stages.masks; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"

# 0. where the masks engine's 0.29 s/image (vit_h, threshold 0) goes: phases and top CUDA ops
timeout 90 python3 "$REPO/benchmarks/profile_masks.py" --device cuda --sam vit_h --images 8 \
    --out "$OUT/profile_vit_h.json" 2>&1 | grep -v -i warn | tail -60

# 1. vit_h + ViT-L-14: the whole label path's images/s and peak memory, bf16 vs fp32 mask
#    agreement, the labels pair and the pipeline's stages (the reference masks engine at
#    threshold 0 with vit_h takes minutes, so only the batched one is timed here)
timeout 150 python3 "$REPO/benchmarks/bench_engine.py" --device cuda --setups vit_h:ViT-L-14 --skip-reference-masks \
    --images 16 --batch 8 --batched-points-per-batch 512 --clip-batch 256 \
    --pipeline 240 --out "$OUT/engine_vit_h.json" 2>&1 | tee "$OUT/engine_vit_h.log" | grep -v -i warn

# 2. bf16 training throughput and predict latency, vit_b and vit_h (issue 9)
timeout 100 python3 "$REPO/benchmarks/bench_model.py" --device cuda --bf16 --sizes vit_b vit_h --train-steps 5 \
    --predict-images 2 --points-per-side 32 --out "$OUT/model.json" 2>&1 | tee "$OUT/model.log" | tail -8

# 3. vit_b + ViT-B-32: both engines side by side, masks and labels
timeout 80 python3 "$REPO/benchmarks/bench_engine.py" --device cuda --setups vit_b:ViT-B-32 \
    --images 4 --batch 4 --points-per-batch 64 --batched-points-per-batch 512 --clip-batch 256 \
    --out "$OUT/engine_vit_b.json" 2>&1 | tee "$OUT/engine_vit_b.log" | grep -v -i warn
