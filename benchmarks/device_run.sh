#!/usr/bin/env bash
# The GPU checks in one call on the device machine (its python3 already holds torch, torchvision, h5py, click,
# scikit-learn, tqdm, matplotlib, pytest, hypothesis; no venv, nothing to install). Prepare here, once:
#
#     .venv/bin/python -m benchmarks.lfw_slice --data-root ../shared/data --out .device/lfw   # 3,708 images, 32 MiB
#
# then call the device tool with  command="bash benchmarks/device_run.sh"  carry=[".device"]  timeout_s=540.
# What comes back under $OUT: nvidia-smi.txt, pytest.log, gpu_check.log, gpu_check.json, gpu_check.md.
# Without a GPU it still runs (tests skip, gpu_check takes its small CPU sizes), so it can be tried here.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/device}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LFW_ROOT=${LFW_ROOT:-.device/lfw}
[ -d "$LFW_ROOT" ] || echo "no LFW slice at $LFW_ROOT: the embedding rows will be skipped"

(nvidia-smi || echo "no nvidia-smi") >"$OUT/nvidia-smi.txt" 2>&1
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee -a "$OUT/nvidia-smi.txt"

# The CUDA tests first (about a minute): a failure here is reported, and the timings still run.
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest.log"
tests=$?

timeout 360 "$PYTHON" -m benchmarks.gpu_check --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
check=$?

echo "tests rc=$tests gpu_check rc=$check"
[ "$tests" -eq 0 ] && [ "$check" -eq 0 ]
