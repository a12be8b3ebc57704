#!/usr/bin/env bash
# Rewrite constraints.txt from the newest-releases environment (.venv-newest), after its test run passed:
#   METASTONE_NEWEST=1 bash scripts/test.sh && bash scripts/lock.sh
# torch is left out on purpose: scripts/setup.sh installs the CPU build by its exact version, and users keep theirs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${1:-.venv-newest}"
{
  echo "# Versions this project last tested (bash scripts/test.sh installs exactly these; pyproject.toml keeps ranges)."
  echo "# Regenerate with scripts/lock.sh after 'METASTONE_NEWEST=1 bash scripts/test.sh' passes."
  "$venv/bin/python" -m pip list --format=freeze --exclude-editable | grep -viE '^(torch|pip|setuptools|wheel|nvidia-[a-z0-9-]+|triton)==' | grep -v '^-e '
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages, from $venv"
