#!/usr/bin/env bash
# The GPU checks, in one go (issue 9: "run the same groups there"; issue 10: P = 10^7), within
# one device call of 600 s:
#   bash benchmarks/gpu.sh OUT_DIR
# 1. every CUDA test (tests/test_cases.py's declarative cases against the CPU references, the
#    stateful forwards, the convolution routes), pytest-xdist;
# 2. benchmarks/conv_routes.py: ResNet-18's convolutions by samples as groups and by patches;
# 3. benchmarks/host_syncs.py: the synchronisations of one fisher call, by site;
# 4. benchmarks/lanczos_scale.py scale at P = 10^7 on CUDA, paired with full reorthogonalisation;
# 5. benchmarks/run.py's arch group on CUDA (peers included).
# Each step has its own time limit and log, so a slow step leaves the others' results.
set -u
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
{ nvidia-smi -L; python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__)"; } \
    > "$out/tests.log" 2>&1
timeout 120 python3 -m pytest tests -k "cuda or patches_on" -n 8 -p no:cacheprovider -rf --tb=short \
    >> "$out/tests.log" 2>&1; echo "exit $?" >> "$out/tests.log"
timeout 45 python3 benchmarks/conv_routes.py --device cuda --n 128 > "$out/conv_routes.log" 2>&1
echo "exit $?" >> "$out/conv_routes.log"
timeout 45 python3 benchmarks/host_syncs.py > "$out/host_syncs.log" 2>&1; echo "exit $?" >> "$out/host_syncs.log"
timeout 100 python3 benchmarks/lanczos_scale.py scale --device cuda --products 100 --paired \
    > "$out/lanczos.log" 2>&1; echo "exit $?" >> "$out/lanczos.log"
timeout 240 python3 benchmarks/run.py --device cuda --only arch --archs resnet18,gpt,lstm --repeats 5 \
    --group-budget-s 8 --out "$out/bench" > "$out/bench.log" 2>&1; echo "exit $?" >> "$out/bench.log"
