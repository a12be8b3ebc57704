#!/usr/bin/env bash
# Create the virtualenv (if needed) and install this package with its dev extras. Sourced by test.sh and demo.sh.
#
# By default every package is held at the version this project last tested (constraints.txt), so a release upstream
# can never change what CI runs. METASTONE_NEWEST=1 installs the newest releases that pyproject.toml's ranges allow,
# into .venv-newest (the check to run before moving the lock; see "Tested versions" in the README):
#   METASTONE_NEWEST=1 bash scripts/test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=.venv
[ "${METASTONE_NEWEST:-0}" = 1 ] && venv=.venv-newest
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
# Install the CPU torch wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
if [ "$venv" = .venv-newest ]; then
  # Everything at its newest release within pyproject.toml's ranges, except torch: the build installed stays.
  echo "torch==$(python -c 'import torch; print(torch.__version__)')" > "$venv/torch-constraint.txt"
  pins=(--upgrade --upgrade-strategy eager -c "$venv/torch-constraint.txt")
else
  pins=(-c constraints.txt)
fi
python -m pip install -q "${pins[@]}" -e ".[dev]"
# DeepSpeed for the ZeRO-2/3 tests: its light dependencies first, then DeepSpeed itself with --no-deps so that pip
# never replaces the CPU torch (its resolver may otherwise pick a newer CUDA build).
python -m pip install -q "${pins[@]}" "pydantic>=2" psutil einops hjson msgpack ninja py-cpuinfo
python -m pip install -q "${pins[@]}" --no-deps "deepspeed>=0.19.8,<0.20"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
