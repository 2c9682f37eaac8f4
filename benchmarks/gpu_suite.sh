#!/usr/bin/env bash
# The GPU suite: on a CUDA machine (no network needed), run the CUDA tests and every GPU benchmark
# within about 9 minutes, write logs and results under benchmarks/results/<machine>/, copy them to
# $OUT (flat, at most 8 files) when that variable is set, and exit non-zero when a test fails.
#
#   bash benchmarks/gpu_suite.sh
#
# Environment: PYTHON (default python), SUITE_SECONDS (whole suite, default 540),
# SUITE_TEST_SECONDS (tests, default 240), SUITE_WORKERS (pytest-xdist processes, default 8),
# SUITE_TESTS=0 (skip the tests: a later call that only measures), SUITE_TUNE=1 (run the tiling
# sweeps of benchmarks/tune.py first), SUITE_TUNE_ARGS (arguments for benchmarks.tune, e.g.
# "--only attention"), SUITE_APPLY_TUNING=1 (benchmarks.run uses the fastest attention tilings of
# the sweep's tune.json), SUITE_BENCH=0 (skip benchmarks.run), SUITE_BENCH_ARGS (extra arguments for
# benchmarks.run, e.g. "--only pretrain --profile" or "--no-compile").
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python}
TOTAL=${SUITE_SECONDS:-540}
TEST_SECONDS=${SUITE_TEST_SECONDS:-240}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu suite: CUDA is not available here; nothing run (skipped)"
    exit 0
fi
slug=$("$PY" -c "
import torch
from benchmarks.harness import environment, machine_slug
print(machine_slug(environment(torch.device('cuda'))))") || slug=cuda-unknown
RES=benchmarks/results/$slug
mkdir -p "$RES"
echo "gpu suite: results in $RES"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>/dev/null || true
  "$PY" -m audiomae.info 2>/dev/null || true; } > "$RES/machine.txt"

# 1. tests: everything marked gpu or slow, then the kernel test files, which run on CUDA tensors
#    when a GPU is present (under the interpreter otherwise). With pytest-xdist the tests run in
#    SUITE_WORKERS processes (default 8): compiling the kernels for each shape is the slow part.
tests_rc=0
if [ "${SUITE_TESTS:-1}" != 0 ]; then
kernel_tests=$(ls tests/test_window_attention.py tests/test_step_kernels.py tests/test_fbank_kernel.py tests/test_gelu_mlp.py 2>/dev/null)
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "${SUITE_WORKERS:-8}"); fi
{
    echo "== python -m pytest -q -m 'gpu or slow' --runslow ${XDIST[*]} tests"
    timeout "$TEST_SECONDS" "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" -m "gpu or slow" --runslow tests
    rc1=$?
    left=$(( TEST_SECONDS - $(elapsed) ))
    rc2=0
    if [ -n "$kernel_tests" ]; then
        echo "== python -m pytest -q -m 'not gpu and not slow' $kernel_tests (CUDA tensors)"
        if [ "$left" -gt 10 ]; then
            timeout "$left" "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" -m "not gpu and not slow" \
                $kernel_tests
            rc2=$?
        else
            echo "no time left for the kernel test files"; rc2=124
        fi
    fi
    echo "== test exit codes: $rc1 $rc2 (124: time limit)"
    [ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ]
} 2>&1 | tee "$RES/tests.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu suite: tests exit code $tests_rc after $(elapsed) s"
fi

# 2. with SUITE_TUNE=1, the tiling sweeps of benchmarks/tune.py (about 2 minutes)
if [ "${SUITE_TUNE:-0}" = 1 ]; then
    # shellcheck disable=SC2086
    timeout "${SUITE_TUNE_SECONDS:-180}" "$PY" -m benchmarks.tune --out "$RES" ${SUITE_TUNE_ARGS:-} 2>&1 \
        | tee "$RES/tune.log"
    echo "gpu suite: tuning sweeps done after $(elapsed) s"
fi

# 3. benchmarks, in the time that is left (each section stops measuring when its share is used up)
bench_rc=0
if [ "${SUITE_BENCH:-1}" != 0 ]; then
budget=$(( TOTAL - $(elapsed) - 30 ))
if [ "$budget" -lt 60 ]; then budget=60; fi
TUNING_ARGS=()
if [ "${SUITE_APPLY_TUNING:-0}" = 1 ] && [ -f "$RES/tune.json" ]; then TUNING_ARGS=(--tuning "$RES/tune.json"); fi
# shellcheck disable=SC2086
timeout $(( budget + 60 )) "$PY" -m benchmarks.run --quick --out "$RES" --time-budget "$budget" \
    "${TUNING_ARGS[@]}" ${SUITE_BENCH_ARGS:-} 2>&1 | tee "$RES/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu suite: benchmarks exit code $bench_rc after $(elapsed) s" | tee -a "$RES/bench.log"
fi

# 4. copy to $OUT: flat, at most 8 files
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    for f in results.md results.json attention.png tests.log bench.log machine.txt tune.log profile.txt; do
        [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/$f"
    done
fi
if [ "$tests_rc" -ne 0 ]; then exit "$tests_rc"; fi
exit "$bench_rc"
