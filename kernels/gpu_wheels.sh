#!/usr/bin/env bash
# Make the wheels kernels/gpu_check.sh installs on a bare GPU machine that has torch, triton, transformers,
# numpy, pandas, pyarrow, accelerate and pytest but no network. Run from the repo root on a machine with pip:
#     bash kernels/gpu_wheels.sh            # -> .whl/ (ignored by git; about 8 MiB)
# Two sets for `datasets`: the tested one (needs pyarrow >= 24) and a fallback for an older pyarrow; gpu_check.sh
# installs the one that fits the machine. DeepSpeed is built as a pure-Python wheel (DS_BUILD_OPS=0: no C++ ops;
# the trainer uses torch's AdamW).
set -euo pipefail
cd "$(dirname "$0")/.."
W=.whl
rm -rf "$W" && mkdir -p "$W/datasets-new" "$W/datasets-old"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)
get() { python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$1" "${@:2}"; }
get "$W" math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 liger-kernel==0.8.5 \
    cut-cross-entropy==25.1.1 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing_extensions==4.16.0
get "$W/datasets-new" datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
get "$W/datasets-old" datasets==4.0.0 dill==0.3.8 multiprocess==0.70.16 fsspec==2025.3.0
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$W" deepspeed==0.19.8
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$W" .
du -sh "$W"
