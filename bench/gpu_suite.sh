#!/usr/bin/env bash
# One-shot GPU validation on a bare lent machine: build _C with CUDA, run the GPU tests,
# compute-sanitizer (memcheck, racecheck) on the CUDA kernels' tests, measure the ceilings and run
# every benchmark. Writes everything under $OUT (default ./gpu_out). Usage: bash bench/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/suite.log"; }

log "build"
pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { log "build failed"; tail -50 "$OUT/build.log"; exit 1; }
python -m elastic_kernels.env | tee "$OUT/env.txt"

log "tests (GPU)"
ELASTIC_KERNELS_TEST_GPU=1 python -m pytest python_tests -q -x -p no:cacheprovider \
  --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT/suite.log"; tail -5 "$OUT/tests.log"

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    log "compute-sanitizer $tool"
    ELASTIC_KERNELS_TEST_GPU=1 compute-sanitizer --tool "$tool" --error-exitcode 3 --target-processes all \
      python -m pytest python_tests -q -p no:cacheprovider -k "cuda" >"$OUT/sanitizer_$tool.log" 2>&1
    echo "$tool rc=$?" | tee -a "$OUT/suite.log"; tail -3 "$OUT/sanitizer_$tool.log"
  done
fi

log "benchmarks"
ELASTIC_KERNELS_BENCH_JSON="$OUT/bench.json" python -m pytest bench -q -p no:cacheprovider \
  --benchmark-columns=median,iqr >"$OUT/bench.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/suite.log"; grep -A200 "width sweep" "$OUT/bench.log" | head -80
log "done"
