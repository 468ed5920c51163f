#!/usr/bin/env bash
# GPU readiness in one script (at most ~8 minutes on one GPU): CUDA tests, the paper UNet at batch 128 in fp32, bf16
# and bf16 + compile, a torchrun launch, 1- and 2-step sampling with decode -> benchmarks/results/gpu-check-cuda.*
# Without a GPU (or with --toy) the same steps run at toy size on the CPU (tests/test_benchmarks.py does that).
#
#   bash benchmarks/gpu_check.sh                 # on a GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --toy --out DIR
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec python benchmarks/gpu_check.py "$@"
