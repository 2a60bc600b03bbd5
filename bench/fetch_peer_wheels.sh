#!/usr/bin/env bash
# Downloads the peers that bench/gpu_bench.py compares against (Inf-CL, Cut Cross-Entropy, Liger-Kernel) as wheels
# into bench/wheels (gitignored), for the GPU machine, which has no package registry: the device tool carries the
# folder (`carry: ["bench/wheels"]`) and bench/gpu_suite.sh installs them with `pip install --no-index --no-deps`.
#
#     bash bench/fetch_peer_wheels.sh
#
# The versions are pinned (the ones whose source gpu_bench.py was written against). Each must be pure Python
# (py3-none-any): their compiled parts are Triton kernels, built on the GPU machine. Their dependencies (torch,
# triton, numpy; packaging for Liger) are already on the GPU machine, so --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=(inf-cl==1.2.1 cut-cross-entropy==25.1.1 liger-kernel==0.8.5)
PYTHON=${PYTHON:-python3}
mkdir -p bench/wheels
rm -f bench/wheels/*.whl  # one version of each: two would stop the install
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 -d bench/wheels "${PEERS[@]}"
for wheel in bench/wheels/*.whl; do
  case "$wheel" in
    *-py3-none-any.whl) ;;
    *) echo "error: $wheel is not a pure-Python wheel" >&2; exit 1 ;;
  esac
  echo "$(basename "$wheel"): requires $("$PYTHON" - "$wheel" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    needs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
             if l.startswith("Requires-Dist:") and "extra ==" not in l]
print(", ".join(needs) or "nothing")
PY
)"
done
echo "$(ls bench/wheels/*.whl | wc -l) wheels in bench/wheels ($(du -sh bench/wheels | cut -f1))"
