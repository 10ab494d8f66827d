#!/usr/bin/env bash
# One command, at most ~8 minutes on one GPU: side-by-side ratios of extraction (bf16 vs fp32), SAE training
# (toolkit vs eai-sparsify with its Triton kernels) and wMPPC (torch engine vs numpy engine). See bench/gpu_check.py.
#   bench/gpu_check.sh            # on a machine with a CUDA GPU
#   bench/gpu_check.sh --quick    # toy sizes (also what runs without a GPU: checks the script, measures nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
if uv run --with eai-sparsify python -c "import sparsify" >/dev/null 2>&1; then
    exec timeout 480 uv run --with eai-sparsify python bench/gpu_check.py "$@"
fi
echo "note: eai-sparsify could not be installed here; its column reads n/a" >&2
exec timeout 480 uv run python bench/gpu_check.py "$@"
