#!/usr/bin/env bash
# The prepared accelerator run (issue 24), one call on a fresh GPU machine with this repository:
#   bash benchmarks/accelerator.sh OUT [WHEELS]
# 1. installs what the machine lacks: the wheels in WHEELS (default .whl/, carried along: see the device notes in
#    benchmarks/README.md) without the index, else from the package index when one is reachable. The pinned CUDA jax
#    (requirements.txt's jax version, jax[cuda12]) is installed when its wheels are there; otherwise the machine's own
#    jax is used and its version is recorded in the results (accelerator.json: machine.jax);
# 2. runs python -m benchmarks.accelerator --out=OUT (the full-size benchmark table in float32 and bfloat16 and a
#    short full-size SEAM training on generated data), which writes OUT/accelerator.{json,md}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/accelerator.sh OUT [WHEELS]}
wheels=${2:-.whl}
mkdir -p "$out"
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/seam_site "$wheels"/*.whl \
    && export PYTHONPATH=/tmp/seam_site:$PWD
else
  pin=$(grep -E '^jax==' requirements.txt | cut -d= -f3)
  python3 -m pip install -q "jax[cuda12]==$pin" grain ml-collections tensorboardX 2>&1 | tail -2 \
    || echo "no package index: using the installed jax"
  export PYTHONPATH=$PWD
fi
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())' | tee "$out/jax.txt"
python3 -m benchmarks.accelerator --out="$out" "${@:3}"
