#!/usr/bin/env bash
# The GPU check on a bare GPU machine (no network): install the wheels kernels/gpu_wheels.sh made into
# /tmp/site, then run kernels/gpu_check.py; its results go to $OUT (or --out DIR). Arguments pass through:
#     bash kernels/gpu_check.sh [--sections correctness,pytest,bench,train] [--tokens 4096,16384,32768]
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  pa=$(python3 -c "import pyarrow; print(pyarrow.__version__.split('.')[0])" 2>/dev/null || echo 0)
  set_=datasets-new; [ "$pa" -ge 24 ] || set_=datasets-old
  echo "[gpu_check.sh] pyarrow major $pa: installing .whl/*.whl and .whl/$set_/*.whl into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl .whl/$set_/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python3 kernels/gpu_check.py "$@"
