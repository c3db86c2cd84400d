#!/usr/bin/env bash
# GPU check of the image path (issue 8), for a lent GPU machine: run from the repository root,
#   OUT=<folder> bash benchmarks/gpu_check.sh
# Installs nothing. Uses the machine's python if it has torch with CUDA; localfm runs from src/, and
# pure-Python dependencies the machine lacks (torchdiffeq, pyyaml, tqdm, safetensors' abi3 wheel)
# may be carried in from the repo's .venv (benchmarks/gpu_check.py appends them to sys.path).
# Writes $OUT/gpu_check.json (and gpu_check.log); copy them to benchmarks/results/.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=$(command -v python3 || command -v python || true)
if [ -z "$PY" ] || ! "$PY" -c 'import torch' 2>/dev/null; then
    echo '{"error": "no python with torch on this machine; nothing measured (installing torch is not allowed here)"}' > "$OUT/gpu_check.json"
    echo "no python with torch" >&2
    exit 0
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PY" -u benchmarks/gpu_check.py --out "$OUT/gpu_check.json" --budget "${BUDGET:-90}" 2>&1 | tee "$OUT/gpu_check.log"
