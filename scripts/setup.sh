#!/usr/bin/env bash
# Create .venv (if needed) and install this package with its dev extras. Sourced by test.sh and demo.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Install the CPU torch wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# DeepSpeed for the ZeRO-2/3 tests: its light dependencies first, then DeepSpeed itself with --no-deps so that pip
# never replaces the CPU torch (its resolver may otherwise pick a newer CUDA build). Pinned: the version tested here.
python -m pip install -q "pydantic>=2" psutil einops==0.8.2 hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 py-cpuinfo==9.0.0
python -m pip install -q --no-deps deepspeed==0.19.8
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
