#!/usr/bin/env bash
# The GPU checks, in one go (issue 9: "run the same groups there"; issue 10: P = 10^7):
#   bash benchmarks/gpu.sh OUT_DIR
# 1. tests/test_cases.py's declarative cases on CUDA against the CPU references (pytest-xdist);
# 2. benchmarks/lanczos_scale.py scale at P = 10^7 on CUDA, paired with full reorthogonalisation;
# 3. benchmarks/run.py's arch, fisher and ggn groups on CUDA (peers included).
# Each step has its own time limit and log, so a slow step leaves the others' results.
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__)"; } \
    > "$out/tests.log" 2>&1
timeout 300 python3 -m pytest tests/test_cases.py -k cuda -n 14 -p no:cacheprovider -rf --tb=line \
    >> "$out/tests.log" 2>&1; echo "exit $?" >> "$out/tests.log"
timeout 100 python3 benchmarks/lanczos_scale.py scale --device cuda --products 100 --paired \
    > "$out/lanczos.log" 2>&1; echo "exit $?" >> "$out/lanczos.log"
timeout 260 python3 benchmarks/run.py --device cuda --only arch,fisher,ggn --repeats 5 \
    --group-budget-s 15 --out "$out/bench" > "$out/bench.log" 2>&1; echo "exit $?" >> "$out/bench.log"
