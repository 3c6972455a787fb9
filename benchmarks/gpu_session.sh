#!/usr/bin/env bash
# A GPU session in one script: every test marked `gpu`, then the benchmarks with --device cuda (issues 11, 13, 15),
# each step under its own time limit (about 8 minutes in all), one log a step in $OUT (default results/gpu).
# Usage: bash benchmarks/gpu_session.sh [cuda|cpu]   (cpu: a smoke run of the same steps with --quick settings).
# A machine without fisherlab's dependencies or the peers (curvlinops, BackPACK, nngeometry) takes them as wheels
# in .whl/ at the repository root (pip download --no-deps ... -d .whl NAME==VERSION for the machine's Python),
# installed into /tmp/site first; without .whl/ the machine's own packages are used.
set -u
cd "$(dirname "$0")/.."
DEV=${1:-cuda}; OUT=${OUT:-results/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "$DEV" = cuda ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/env.log" 2>&1 || { echo "wheel install failed"; cat "$OUT/env.log"; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if [ "$DEV" = cuda ]; then Q=""; else Q="--quick"; fi
step() {  # step NAME SECONDS CMD... : runs CMD with a time limit, output to $OUT/NAME.log and a summary line
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  { echo "### $(date -u +%FT%TZ) $name: $*"; timeout -k 5 "$limit" "$@"; echo "### rc=$? after $((SECONDS - t0)) s"; } \
    >> "$OUT/$name.log" 2>&1
  tail -1 "$OUT/$name.log"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1; nproc; uptime
  python3 -c "import sys, torch, numpy, xarray, scipy, h5netcdf; print(sys.version); print('torch', torch.__version__, torch.version.cuda, torch.cuda.is_available(), 'xarray', xarray.__version__, 'numpy', numpy.__version__); import curvlinops, backpack, nngeometry; print('peers: curvlinops, backpack, nngeometry')"; } >> "$OUT/env.log" 2>&1
tail -4 "$OUT/env.log"
# 1. every test marked gpu (skipped on CPU), in the files that hold them
PLUG=$(python3 -c "import importlib.metadata as m; print('' if any(e.name == 'fisherlab' for e in m.entry_points(group='pytest11')) else '-p fisherlab.pytest_plugin')")
step tests 100 python3 -m pytest -q $PLUG -p no:cacheprovider -m gpu -n 0 $(grep -l "mark.gpu" tests/test_*.py)
# 2. GPT products at 1M and 10M against curvlinops (issue 11)
if [ "$DEV" = cuda ]; then S="--sizes 1M,10M"; else S=""; fi
step transformer 75 python3 benchmarks/bench_transformer.py $S --parts products --device "$DEV" --repeats 3 $Q
# 5. one full fidelity evaluation of the 10M GPT (issue 13's < 10 min target, on the GPU)
if [ "$DEV" = cuda ]; then S="--sizes 10M"; else S=""; fi
step fidelity 150 python3 benchmarks/bench_transformer.py $S --parts fidelity --device "$DEV" --repeats 1 $Q
# 3. side by side with the peers (issue 15)
step peers 80 python3 benchmarks/bench_peers.py --device "$DEV" --models mlp,cnn,gpt --repeats 3 $Q
# 4. exact NGD methods (issue 13): MLP N = 1024 and the GPT 1M
if [ "$DEV" = cuda ]; then G="--gpt --gpt-size 1M"; else G=""; fi
step exact_ngd 50 python3 benchmarks/bench_exact_ngd.py $G --device "$DEV" --repeats 2 $Q
nvidia-smi --query-gpu=memory.used,temperature.gpu --format=csv >> "$OUT/env.log" 2>&1
