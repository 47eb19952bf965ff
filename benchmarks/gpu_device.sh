#!/usr/bin/env bash
# The one prepared command for a lent GPU machine: environment, then benchmarks/gpu.py (every kernel
# checked against PyTorch and timed, then end to end), logs under $OUT.
#
#   here, once per checkout:   bash benchmarks/gpu_device.sh --prepare
#   on the GPU (device tool):  run(command="bash benchmarks/gpu_device.sh", carry=[".gpu"], timeout_s=600)
#
# The GPU machine is bare and offline: it runs its own python3 (its torch and Triton, not this
# project's pins) with the repository on PYTHONPATH. --prepare copies MiniLM's tokenizer files (the
# bert-base benchmark model's vocabulary; the bundled model package is too large to carry) into .gpu/,
# which git ignores through .git/info/exclude. Budget: GPU_BENCH_TIMEOUT (480 s) of the run (docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    mkdir -p .gpu/vocab
    src=$(.venv/bin/python -c 'from turboserve.loader import default_model_path; print(default_model_path())') || exit 1
    cp "$src"/tokenizer.json "$src"/tokenizer_config.json "$src"/vocab.txt .gpu/vocab/ || exit 1
    echo "prepared .gpu/vocab; carry .gpu"
    exit 0
fi

OUT=${OUT:-/tmp/turboserve-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1   # keeps a carried-wheel path
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
    $PY -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
            "transformers", transformers.__version__,
            torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
} 2>&1 | tee "$OUT/env.log"
vocab=()
[[ -d .gpu/vocab ]] && vocab=(--vocab-from .gpu/vocab)
timeout "${GPU_BENCH_TIMEOUT:-480}" $PY benchmarks/gpu.py "${vocab[@]}" "$@" 2>&1 | tee "$OUT/gpu.log"
