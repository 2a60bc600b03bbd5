#!/usr/bin/env bash
# The GPU suite: one command on a GPU machine without network that builds fastcache with its CUDA kernels, installs
# the peer wheels, runs the CUDA-marked tests and the GPU benchmarks, and writes everything into OUTDIR.
#
#     FASTCACHE_COMMIT=<sha> bash bench/gpu_suite.sh OUTDIR
#     bash bench/gpu_suite.sh OUTDIR --dry-run    # no GPU: no build, CUDA tests skip, gpu_bench.py --dry-run
#
# OUTDIR gets five files: suite.json (commit, GPU, each phase's exit status and seconds), suite.log (every phase's
# output), junit_cuda.xml (the tests), gpu_bench.json and gpu_bench.csv (bench/gpu_bench.py). Every phase has a
# timeout and the whole suite a budget (SUITE_BUDGET_S, default 500 s: it fits one 600 s device command); the
# benchmark gets what the build and the tests left and records what it had to skip and why. A failing phase does
# not stop the later ones. bench/README.md says how the lead runs it and where the results go.
set -uo pipefail
OUTDIR=${1:?usage: bash bench/gpu_suite.sh OUTDIR [--dry-run]}
DRY_RUN=0
[ "${2:-}" = "--dry-run" ] && DRY_RUN=1
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PYTHON=${PYTHON:-python3}
SUITE_BUDGET_S=${SUITE_BUDGET_S:-500}
BUILD_TIMEOUT_S=${BUILD_TIMEOUT_S:-240}
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-150}
MEMCHECK_TIMEOUT_S=${MEMCHECK_TIMEOUT_S:-60}
RACECHECK_TIMEOUT_S=${RACECHECK_TIMEOUT_S:-60}
LOG="$OUTDIR/suite.log"
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FASTCACHE_COMMIT=${FASTCACHE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
: > "$LOG"
PHASES=()

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_suite $(elapsed)s] $*" | tee -a "$LOG"; }
# phase NAME TIMEOUT_S COMMAND...: runs COMMAND under a timeout, its output into the log; records rc and seconds
phase() {
  local name=$1 limit=$2 begin rc
  shift 2
  begin=$(date +%s)
  say "$name: $* (timeout ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && say "$name: timed out after ${limit}s"
  say "$name: exit $rc in $(( $(date +%s) - begin ))s"
  PHASES+=("\"$name\": {\"rc\": $rc, \"seconds\": $(( $(date +%s) - begin ))}")
  return "$rc"
}

say "commit $FASTCACHE_COMMIT, output in $OUTDIR"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader >> "$LOG" 2>&1
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" >> "$LOG" 2>&1

# a. the extension with its CUDA kernels (sm_90 only: this machine's), offline
export FASTCACHE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
if [ "$DRY_RUN" = 1 ]; then
  say "build: skipped (dry run)"
else
  phase build "$BUILD_TIMEOUT_S" "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . \
    && phase check_build 60 "$PYTHON" -c "import fastcache._C as C; missing = [f for f in ('contrastive_epilogue_cuda', \
'lambda_loss_cuda', 'plistmle_cuda', 'listnet_cuda') if not hasattr(C, f)]; assert not missing, \
f'fastcache._C lacks {missing}'; print('fastcache._C has the CUDA epilogue and ranking kernels')"
fi

# the peers, from the wheels fetched by bench/fetch_peer_wheels.sh (carried along: no registry here)
PEERS_DIR=/tmp/fastcache_peers
if [ "$DRY_RUN" = 0 ] && compgen -G "bench/wheels/*.whl" > /dev/null; then
  phase peers 120 "$PYTHON" -m pip install --no-index --no-deps --no-compile --upgrade --target "$PEERS_DIR" \
    bench/wheels/*.whl && export PYTHONPATH="$PEERS_DIR${PYTHONPATH:+:$PYTHONPATH}"
elif [ "$DRY_RUN" = 1 ]; then
  say "peers: not installed (dry run)"
else
  say "peers: no wheels in bench/wheels (run bench/fetch_peer_wheels.sh and carry bench/wheels): peers will be recorded as not installed"
fi

# b. the CUDA-marked tests (the CUDA epilogue, the Triton kernels on the GPU); a collection error in a CPU-only test
# module must not stop them
if [ "$DRY_RUN" = 1 ]; then TESTS=(tests/test_contrastive_cuda.py); else TESTS=(tests/); fi
FASTCACHE_REQUIRE_CUDA=$(( 1 - DRY_RUN )) phase tests "$TEST_TIMEOUT_S" "$PYTHON" -m pytest -q -m cuda \
  -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUTDIR/junit_cuda.xml" "${TESTS[@]}"
grep -E "^(FAILED|ERROR) |(passed|failed|skipped|errors?|deselected)[^|]* in [0-9.]+s" "$LOG" | tail -n 25

# the CUDA epilogue and ranking kernels under compute-sanitizer: memcheck (out-of-bounds and misaligned accesses),
# a small subset
if [ "$DRY_RUN" = 0 ] && command -v compute-sanitizer > /dev/null; then
  FASTCACHE_REQUIRE_CUDA=1 phase memcheck "$MEMCHECK_TIMEOUT_S" compute-sanitizer --tool memcheck --error-exitcode 3 \
    "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_contrastive_cuda.py tests/test_ranking_cuda.py \
    -k "(stream and not ranking) or (test_epilogue_shapes and dtype0) or test_edge_rows"
  grep -E "ERROR SUMMARY|(passed|failed)[^|]* in [0-9.]+s" "$LOG" | tail -n 3
  # racecheck: shared-memory hazards (the ranking kernels keep their rows in shared memory), a smaller subset
  FASTCACHE_REQUIRE_CUDA=1 phase racecheck "$RACECHECK_TIMEOUT_S" compute-sanitizer --tool racecheck \
    --error-exitcode 3 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_contrastive_cuda.py \
    tests/test_ranking_cuda.py -k "(stream and not ranking) or test_edge_rows"
  grep -E "RACECHECK SUMMARY|ERROR SUMMARY|(passed|failed)[^|]* in [0-9.]+s" "$LOG" | tail -n 3
else
  say "memcheck, racecheck: skipped (dry run or no compute-sanitizer)"
fi

# c. the benchmarks, with what is left of the budget
LEFT=$(( SUITE_BUDGET_S - $(elapsed) - 15 ))
if [ "$LEFT" -gt 30 ]; then
  BENCH_ARGS=(--out "$OUTDIR" --budget-s "$LEFT")
  [ "$DRY_RUN" = 1 ] && BENCH_ARGS+=(--dry-run --dtypes bfloat16)
  phase bench $(( LEFT + 60 )) "$PYTHON" bench/gpu_bench.py "${BENCH_ARGS[@]}"
  sed -n '/^torch.mm bf16/,$p' "$LOG"
else
  say "bench: skipped, only ${LEFT}s of the ${SUITE_BUDGET_S}s budget left"
  PHASES+=("\"bench\": {\"rc\": null, \"skipped\": \"budget spent (${LEFT}s left)\"}")
fi

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
{
  echo "{"
  echo "  \"commit\": \"$FASTCACHE_COMMIT\","
  echo "  \"gpu\": \"${GPU:-none}\","
  echo "  \"date_utc\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
  echo "  \"seconds\": $(elapsed),"
  echo "  \"phases\": {$(IFS=,; echo "${PHASES[*]}")}"
  echo "}"
} > "$OUTDIR/suite.json"
say "done: $(ls "$OUTDIR" | tr '\n' ' ')"
