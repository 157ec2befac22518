#!/usr/bin/env bash
# The GPU benchmark in one command (on a CUDA machine): ViT-B/16 at 224 px, bf16 autocast, batch 128;
# full fine-tuning, linear probing, LoRA, U-Tuning dual and Res-Tuning-Bypass, torch.compile off and on:
# images/s, peak GPU memory, MFU. Writes bench/results/gpu_vit_base_patch16_224_b128_224px_<gpu>.{json,md}.
# Extra arguments go to bench/bench_gpu.py (e.g. --batch 64, --methods full,lora, --compile off).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec "$PYTHON" bench/bench_gpu.py --device cuda --model vit_base_patch16_224 --img-size 224 --batch 128 "$@"
