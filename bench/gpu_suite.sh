#!/usr/bin/env bash
# The GPU suite: one command on a GPU machine without network that gives the most truth per second, writing its
# results as they come, so that a cut-off run keeps everything that finished.
#
#     FASTCACHE_COMMIT=<sha> bash bench/gpu_suite.sh OUTDIR
#     bash bench/gpu_suite.sh OUTDIR --dry-run    # no GPU: the same plan on CPU (interpreter, tiny shapes)
#
# Phases, in this order (each under `timeout --signal=INT`, so pytest and gpu_bench.py write what they have; a
# failing phase does not stop the later ones; SUITE_BUDGET_S, default 480 s, caps the whole run):
#   1. preflight (~10 s): versions, nvidia-smi, the tools present, the out_dtype GEMM check -> preflight.json; the
#      extension build starts in the background.
#   2. correctness (~60 s): tests/native/test_gpu_smoke.py, ~20 curated cases against the float64 reference: the Triton
#      kernels now, the CUDA kernels once the build is done -> correctness.xml.
#   3. headline (~150 s): the target shape B=65536, N=131072, D=768, bf16: torch.mm ceiling, fastcache (tiled,
#      slab with the Triton and the CUDA epilogue), the peers, sentence-transformers; 2 warm-ups, >= 3 timed runs,
#      then one run kernel by kernel -> bench_rows.jsonl, gpu_bench.json, gpu_bench.csv.
#   3b. multivector (~60 s, while the build may still run): MaxSim (Triton, torch, sentence-transformers, the token
#      GEMM; B=128 and 512, bf16 and fp32, each loss also against float64) and SPLADE's CachedSpladeLoss
#      (fastcache, sentence-transformers, the dense GEMMs) -> the same three files.
#   4. sanitizers (~60 s): compute-sanitizer memcheck on a tiny set (one Triton tiled call included), racecheck on
#      the ranking kernels.
#   5. the rest, as time allows: the broad `-m cuda` tests (-> junit_cuda.xml), then the other benchmark shapes,
#      Matryoshka and the ranking ops (added to bench_rows.jsonl and the report).
# OUTDIR gets at most 8 files: suite.json (commit, GPU, each phase's exit status and seconds; rewritten after each
# phase), suite.log (what the phases printed), preflight.json, correctness.xml, bench_rows.jsonl, gpu_bench.json,
# gpu_bench.csv, junit_cuda.xml. bench/README.md says how to run it and how to read and commit the results.
set -uo pipefail
OUTDIR=${1:?usage: bash bench/gpu_suite.sh OUTDIR [--dry-run]}
DRY_RUN=0
[ "${2:-}" = "--dry-run" ] && DRY_RUN=1
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PYTHON=${PYTHON:-python3}
SUITE_BUDGET_S=${SUITE_BUDGET_S:-480}
LOG="$OUTDIR/suite.log"
WORK=$(mktemp -d /tmp/fastcache_suite.XXXXXX)
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FASTCACHE_COMMIT=${FASTCACHE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export FASTCACHE_REQUIRE_CUDA=$(( 1 - DRY_RUN ))  # on the GPU a CUDA test that would skip fails instead
: > "$LOG"
PHASES=()

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( SUITE_BUDGET_S - $(elapsed) )); }
say() { echo "[gpu_suite $(elapsed)s] $*" | tee -a "$LOG"; }
write_suite_json() {
  local gpu
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  printf '{\n  "commit": "%s",\n  "gpu": "%s",\n  "dry_run": %s,\n  "date_utc": "%s",\n  "seconds": %s,\n  "phases": {%s}\n}\n' \
    "$FASTCACHE_COMMIT" "${gpu:-none}" "$([ "$DRY_RUN" = 1 ] && echo true || echo false)" \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(elapsed)" "$(IFS=,; echo "${PHASES[*]}")" > "$OUTDIR/suite.json"
}
record() {  # record NAME RC SECONDS [NOTE]
  PHASES+=("\"$1\": {\"rc\": $2, \"seconds\": $3${4:+, \"note\": \"$4\"}}")
  write_suite_json
}
# phase NAME LIMIT_S COMMAND...: COMMAND under a timeout (SIGINT first, then SIGKILL 10 s later), its output into
# the log, its exit status and seconds into suite.json; a limit beyond the budget is cut to what is left
phase() {
  local name=$1 limit=$2 begin rc
  shift 2
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -lt 5 ]; then
    say "$name: skipped, the ${SUITE_BUDGET_S}s budget is spent"
    record "$name" null 0 "skipped: budget spent"
    return 0
  fi
  begin=$(date +%s)
  say "$name: $* (timeout ${limit}s)"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && say "$name: timed out after ${limit}s"
  say "$name: exit $rc in $(( $(date +%s) - begin ))s"
  record "$name" "$rc" $(( $(date +%s) - begin ))
  return 0
}
summary() { grep -E "^(FAILED|ERROR) |(passed|failed|skipped|errors?)[^|]* in [0-9.]+s" "$LOG" | tail -n "${1:-8}"; }
has_module() { "$PYTHON" -c "import $1" > /dev/null 2>&1; }
# merge_junit A B OUT: the test cases of two junit files in one
merge_junit() {
  "$PYTHON" - "$@" <<'EOF'
import sys, xml.etree.ElementTree as ET
*sources, target = sys.argv[1:]
root = ET.Element("testsuites")
for path in sources:
    try:
        tree = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        continue
    root.extend(tree.iter("testsuite"))
ET.ElementTree(root).write(target, encoding="unicode")
EOF
}

# 1. preflight ---------------------------------------------------------------------------------------------------
say "commit $FASTCACHE_COMMIT, output in $OUTDIR, budget ${SUITE_BUDGET_S}s"
begin=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader >> "$LOG" 2>&1
timeout 30 "$PYTHON" - "$OUTDIR/preflight.json" "$DRY_RUN" >> "$LOG" 2>&1 <<'EOF'
import importlib, json, shutil, subprocess, sys, torch
out, dry_run = sys.argv[1], sys.argv[2] == "1"
info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "dry_run": dry_run}
for module in ("triton", "sentence_transformers", "transformers", "numpy", "xdist", "pytest_timeout"):
    try:
        info[module] = getattr(importlib.import_module(module), "__version__", "present")
    except ImportError:
        info[module] = None
info["compute_sanitizer"] = shutil.which("compute-sanitizer")
info["nvcc"] = shutil.which("nvcc")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2**30, 1))
    from fastcache.ops.contrastive import out_dtype_gemm_failure
    info["out_dtype_gemm"] = {str(d): out_dtype_gemm_failure(torch.device("cuda"), d) or "ok"
                              for d in (torch.bfloat16, torch.float16)}
json.dump(info, open(out, "w"), indent=2)
print("preflight:", json.dumps(info))
EOF
record preflight $? $(( $(date +%s) - begin ))
# the extension with its CUDA kernels (sm_90 only: this machine's), offline, in the background
BUILD_PID=
if [ "$DRY_RUN" = 0 ]; then
  say "build: started in the background (log: suite.log after it ends)"
  ( export FASTCACHE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-12}
    timeout --signal=INT --kill-after=10 300 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . \
      > "$WORK/build.log" 2>&1 ) &
  BUILD_PID=$!
else
  say "build: skipped (dry run)"
fi
# the peers, from the wheels fetched by bench/fetch_peer_wheels.sh (carried along: no registry here)
if [ "$DRY_RUN" = 0 ] && compgen -G "bench/wheels/*.whl" > /dev/null; then
  phase peers 60 "$PYTHON" -m pip install --no-index --no-deps --no-compile --upgrade --target "$WORK/peers" \
    bench/wheels/*.whl
  export PYTHONPATH="$WORK/peers${PYTHONPATH:+:$PYTHONPATH}"
else
  say "peers: not installed (dry run, or no wheels in bench/wheels: run bench/fetch_peer_wheels.sh and carry them)"
fi
join_build() {
  [ -z "$BUILD_PID" ] && return 0
  local begin rc
  begin=$(date +%s)
  wait "$BUILD_PID"
  rc=$?
  BUILD_PID=
  tail -n 30 "$WORK/build.log" >> "$LOG"
  if ! "$PYTHON" -c "import fastcache._C as C; missing = [f for f in ('contrastive_epilogue_cuda', \
'lambda_loss_cuda', 'plistmle_cuda', 'listnet_cuda') if not hasattr(C, f)]; assert not missing, \
f'fastcache._C lacks {missing}'" >> "$LOG" 2>&1 && [ "$rc" -eq 0 ]; then
    rc=1
  fi
  say "build: exit $rc (waited $(( $(date +%s) - begin ))s)"
  record build "$rc" $(( $(date +%s) - begin )) "waited for the background build"
}

# 2. correctness: the Triton kernels while the build runs, then the CUDA kernels ------------------------------
SMOKE=(-m pytest -q -p no:cacheprovider --tb=short --maxfail=10 -rfE -m gpu_smoke tests/native/test_gpu_smoke.py)
TRITON_CASES="not cuda"
[ "$DRY_RUN" = 1 ] && TRITON_CASES="(B1 or fp64) and not cuda"  # the plan, not the maths (the test run has it all)
phase correctness_triton 90 "$PYTHON" "${SMOKE[@]}" -k "$TRITON_CASES" --junitxml="$WORK/correctness_triton.xml"
merge_junit "$WORK/correctness_triton.xml" "$OUTDIR/correctness.xml"
summary 4

# 3. headline: the target shape, CUDA epilogue last (it waits for the build) ----------------------------------
BENCH=(bench/gpu_bench.py --out "$OUTDIR")
[ "$DRY_RUN" = 1 ] && BENCH+=(--dry-run --dtypes bfloat16 --case-seconds 0.01)
NOT_CUDA=(fastcache_tiled fastcache_slab_triton fastcache_fused_slab inf_cl cut_cross_entropy cut_cross_entropy_exact \
          liger_flce reference st_cached_mbs32)
phase headline 150 "$PYTHON" "${BENCH[@]}" --phase headline --budget-s 140 --cases "${NOT_CUDA[@]}"
# MaxSim has no CUDA kernels (Triton, torch): it runs while the build may still run (SPLADE's fastcache row says
# which backend auto chose then); both dtypes also in a dry run (SPLADE is fp32)
phase multivector 90 "$PYTHON" "${BENCH[@]}" --phase multivector --budget-s 80 --dtypes bfloat16 float32
awk '/^MaxSim \(ColBERT\)/ {last = ""} {last = last $0 "\n"} END {printf "%s", last}' "$LOG" \
  | grep -E "^\| [0-9]|^- \[(met|NOT MET)\] (MaxSim|SPLADE)" | tail -n 30
join_build
phase correctness_cuda 60 "$PYTHON" "${SMOKE[@]}" -k "cuda" --junitxml="$WORK/correctness_cuda.xml"
merge_junit "$WORK/correctness_triton.xml" "$WORK/correctness_cuda.xml" "$OUTDIR/correctness.xml"
summary 4
phase headline_cuda 60 "$PYTHON" "${BENCH[@]}" --phase headline --budget-s 50 --cases fastcache_slab_cuda
sed -n '/^torch.mm bf16/,/^$/p' "$LOG" | tail -n 20

# 4. sanitizers ------------------------------------------------------------------------------------------------
if [ "$DRY_RUN" = 0 ] && command -v compute-sanitizer > /dev/null; then
  phase memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 3 "$PYTHON" -m pytest -q -x \
    -p no:cacheprovider tests/native/test_gpu_smoke.py tests/contrastive/test_contrastive_cuda.py tests/ranking/test_ranking_cuda.py \
    -k "tiled-fp32-B1-D384 or (test_epilogue_shapes and dtype0) or test_edge_rows"
  grep -E "ERROR SUMMARY|(passed|failed)[^|]* in [0-9.]+s" "$LOG" | tail -n 2
  phase racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 3 "$PYTHON" -m pytest -q -x \
    -p no:cacheprovider tests/ranking/test_ranking_cuda.py -k "test_edge_rows or test_non_default_stream"
  grep -E "RACECHECK SUMMARY|ERROR SUMMARY|(passed|failed)[^|]* in [0-9.]+s" "$LOG" | tail -n 2
else
  say "memcheck, racecheck: skipped (dry run or no compute-sanitizer)"
  record sanitizers null 0 "skipped: dry run or no compute-sanitizer"
fi

# 5. the rest, as time allows -------------------------------------------------------------------------------
CUDA_TESTS=(tests/contrastive/test_contrastive_gpu.py tests/matryoshka/test_matryoshka_gpu.py tests/contrastive/test_contrastive_cuda.py
            tests/ranking/test_ranking_cuda.py)
[ "$DRY_RUN" = 1 ] && CUDA_TESTS=(tests/contrastive/test_contrastive_cuda.py)
BROAD=(-m pytest -q -p no:cacheprovider --tb=short --maxfail=25 -rfE -m cuda --junitxml="$OUTDIR/junit_cuda.xml")
has_module xdist && [ "$DRY_RUN" = 0 ] && BROAD+=(-n 4)
has_module pytest_timeout && BROAD+=(--timeout 120)
phase cuda_tests 150 "$PYTHON" "${BROAD[@]}" "${CUDA_TESTS[@]}"
summary 6
phase rest $(( $(left) - 5 )) "$PYTHON" "${BENCH[@]}" --phase rest --budget-s $(( $(left) - 20 ))
grep -E "^- \[(met|NOT MET)\]" "$LOG" | tail -n 12

write_suite_json
rm -rf "$WORK"
say "done: $(ls "$OUTDIR" | tr '\n' ' ')"
