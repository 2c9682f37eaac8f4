#!/usr/bin/env bash
# The GPU suite: on a CUDA machine (no network needed), run the CUDA tests and every GPU benchmark
# within about 9 minutes, write logs and results under benchmarks/results/<machine>/, and exit
# non-zero when a test fails. When $OUT is set, after every step it holds results.tgz (that whole
# folder) and the newest results.md, tests.log, tune.log and bench.log, so a run stopped by a time
# limit still returns what it measured.
#
#   bash benchmarks/gpu_suite.sh
#
# Environment: PYTHON (default python), SUITE_SECONDS (whole suite, default 540),
# SUITE_TEST_SECONDS (tests, default 240), SUITE_WORKERS (pytest-xdist processes, default 8),
# SUITE_TESTS=0 (skip the tests: a later call that only measures), SUITE_KERNEL_TESTS (the kernel
# test files run on CUDA tensors after the gpu/slow tests; default all four), SUITE_TUNE=1 (run the tiling
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
[ -n "${BENCH_COMMIT:-}" ] || echo "gpu suite: BENCH_COMMIT is not set: the results name the commit git reports here"

# what comes back: the whole results folder as one archive, and the newest logs beside it
ship() {
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    # a log appended to while it is read makes tar exit 1 ("file changed"): the archive still holds it
    local part="$OUT/.results.$$.$BASHPID.part"
    tar czf "$part" --warning=no-file-changed -C "$RES" . 2>/dev/null
    if [ "$?" -le 1 ]; then mv -f "$part" "$OUT/results.tgz"; else rm -f "$part"; fi
    for f in results.md tests.log tune.log bench.log; do
        if [ -f "$RES/$f" ]; then cp "$RES/$f" "$OUT/$f"; fi
    done
}

# the CUDA extension, built once before anything uses it (a test stopped by its time limit while
# building would leave torch's build lock behind, and the benchmarks would wait on it); a build
# that overruns its own limit has its lock removed for the same reason
if ! timeout 180 "$PY" -m audiomae.cuda_ext --build > "$RES/build.log" 2>&1; then
    tail -3 "$RES/build.log"
    ext_dir=$("$PY" -c "from audiomae.cuda_ext import build_dir; print(build_dir())" 2>/dev/null) || ext_dir=
    if [ -n "$ext_dir" ]; then rm -f "$ext_dir/lock"; fi
fi
tests_start=$(date +%s)

# 1. tests: everything marked gpu or slow, then the kernel test files, which run on CUDA tensors
#    when a GPU is present (under the interpreter otherwise). With pytest-xdist the tests run in
#    SUITE_WORKERS processes (default 8): compiling the kernels for each shape is the slow part.
tests_rc=0
if [ "${SUITE_TESTS:-1}" != 0 ]; then
kernel_tests=$(ls ${SUITE_KERNEL_TESTS:-tests/test_window_attention.py tests/test_step_kernels.py tests/test_fbank_kernel.py tests/test_gelu_mlp.py} 2>/dev/null)
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "${SUITE_WORKERS:-8}"); fi
{
    echo "== python -m pytest -q -m 'gpu or slow' --runslow ${XDIST[*]} tests"
    timeout "$TEST_SECONDS" "$PY" -m pytest -q -rfE -p no:cacheprovider "${XDIST[@]}" -m "gpu or slow" --runslow tests
    rc1=$?
    left=$(( TEST_SECONDS - ($(date +%s) - tests_start) ))
    rc2=0
    if [ -n "$kernel_tests" ]; then
        echo "== python -m pytest -q -m 'not gpu and not slow' $kernel_tests (CUDA tensors)"
        if [ "$left" -gt 10 ]; then
            timeout "$left" "$PY" -m pytest -q -rfE -p no:cacheprovider "${XDIST[@]}" -m "not gpu and not slow" \
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
ship
fi

# 2. with SUITE_TUNE=1, the tiling sweeps of benchmarks/tune.py (about 2 minutes)
if [ "${SUITE_TUNE:-0}" = 1 ]; then
    # shellcheck disable=SC2086
    timeout "${SUITE_TUNE_SECONDS:-180}" "$PY" -m benchmarks.tune --out "$RES" ${SUITE_TUNE_ARGS:-} 2>&1 \
        | tee "$RES/tune.log"
    echo "gpu suite: tuning sweeps done after $(elapsed) s"
    ship
fi

# 3. benchmarks, in the time that is left (each section stops measuring when its share is used up)
bench_rc=0
if [ "${SUITE_BENCH:-1}" != 0 ]; then
budget=$(( TOTAL - $(elapsed) - 30 ))
if [ "$budget" -lt 60 ]; then budget=60; fi
TUNING_ARGS=()
: > "$RES/bench.log"
if [ "${SUITE_APPLY_TUNING:-0}" = 1 ]; then
    if [ -f "$RES/tune.json" ]; then TUNING_ARGS=(--tuning "$RES/tune.json")
    else echo "gpu suite: SUITE_APPLY_TUNING=1 but no $RES/tune.json: the default tilings are used" | tee -a "$RES/bench.log"; fi
fi
# what the benchmarks have written so far goes out every minute, should the call be stopped; the
# shipper ends at a flag (not a kill, which could leave its tar writing)
rm -f "$RES/.shipped"
( while [ ! -f "$RES/.shipped" ]; do
      for _ in 1 2 3 4 5 6 7 8 9 10 11 12; do [ -f "$RES/.shipped" ] && exit 0; sleep 5; done
      ship
  done ) &
shipper=$!
# shellcheck disable=SC2086
timeout $(( budget + 60 )) "$PY" -m benchmarks.run --quick --out "$RES" --time-budget "$budget" \
    "${TUNING_ARGS[@]}" ${SUITE_BENCH_ARGS:-} 2>&1 | tee -a "$RES/bench.log"
bench_rc=${PIPESTATUS[0]}
touch "$RES/.shipped"; wait "$shipper" 2>/dev/null; rm -f "$RES/.shipped"
echo "gpu suite: benchmarks exit code $bench_rc after $(elapsed) s" | tee -a "$RES/bench.log"
fi

ship
if [ "$tests_rc" -ne 0 ]; then exit "$tests_rc"; fi
exit "$bench_rc"
