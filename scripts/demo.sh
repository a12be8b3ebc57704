#!/usr/bin/env bash
# Set up .venv (if needed) and run the CPU end-to-end reproduction. Usage: bash scripts/demo.sh [metastone demo args]
set -euo pipefail
. "$(dirname "$0")/setup.sh"
metastone demo "$@"
