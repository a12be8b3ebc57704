#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
. "$(dirname "$0")/setup.sh"
python -m pytest "$@"
