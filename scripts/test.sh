#!/usr/bin/env bash
# Set up .venv (if needed), run the pre-commit checks, then the test suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
. "$(dirname "$0")/setup.sh"
# Lint and format checks of .pre-commit-config.yaml: all its hooks are local (ruff from .venv), so no network is
# needed. A hook that fixes a file fails the run, so CI fails on anything unformatted. Its cache lives in .venv.
# pre-commit needs this project's own git checkout; SKIP=hook-id,... leaves hooks out (pre-commit's own variable).
if [ "$(git rev-parse --show-toplevel 2>/dev/null)" = "$(pwd -P)" ]; then
  show_diff=""
  git diff --quiet && show_diff="--show-diff-on-failure"  # clean tree (CI): the diff is exactly what hooks changed
  PRE_COMMIT_HOME="${PRE_COMMIT_HOME:-$PWD/.venv/pre-commit}" python -m pre_commit run --all-files $show_diff
else
  echo "note: not a git checkout; skipping the pre-commit checks" >&2
fi
python -m pytest "$@"
