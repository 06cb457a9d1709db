#!/usr/bin/env bash
# The GPU checks in one run (benchmarks/gpu_suite.py): CUDA tests, train_step (MFU),
# sampler_vs_hf, rlhf_step and the pipeline on CUDA, one JSON; non-zero exit if a step failed.
#   bash benchmarks/gpu_suite.sh --out gpu_suite.json
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_suite.py "$@"
