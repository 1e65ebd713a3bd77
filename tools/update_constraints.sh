#!/usr/bin/env bash
# Moves constraints.txt forward in one command (by hand, never in CI):
#   1. a throwaway venv, torch==2.13.0 first (the CPU build CI uses), then -e ".[dev]" with the newest versions
#      pyproject.toml allows (no constraints);
#   2. the README test command (python -m pytest -q tests) in that venv;
#   3. only if it passes, constraints.txt rewritten from that venv (tools/freeze_constraints.py).
# Then review `git diff constraints.txt` and commit it. Extra arguments go to pytest (e.g. -x).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${CI:-}" ]]; then
    echo "tools/update_constraints.sh moves the pins forward by hand; CI installs with constraints.txt" >&2
    exit 2
fi

TORCH_VERSION="2.13.0"   # the same pin as .ci/run and the README
PYTHON="${PYTHON:-python3}"
workdir="$(mktemp -d "${TMPDIR:-/tmp}/framepack-constraints.XXXXXX")"
trap 'rm -rf "$workdir"' EXIT
venv="$workdir/venv"

echo "== a fresh venv in $venv"
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
"$venv/bin/python" -m pip install --quiet -e ".[dev]"
"$venv/bin/python" -m pip install --quiet --no-deps ccvfi spandrel   # test oracles without torchvision (pyproject.toml)
"$venv/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"

echo "== the README test command with the newest allowed versions"
if ! "$venv/bin/python" -m pytest -q tests "$@"; then
    echo "tests failed with the newest allowed versions: constraints.txt left as it was" >&2
    "$venv/bin/python" tools/freeze_constraints.py > "$workdir/constraints.failed.txt" || true
    diff -u constraints.txt "$workdir/constraints.failed.txt" >&2 || true
    exit 1
fi

"$venv/bin/python" tools/freeze_constraints.py > "$workdir/constraints.txt"
mv "$workdir/constraints.txt" constraints.txt
echo "== constraints.txt written; what moved:"
git diff --stat -- constraints.txt || true
git diff -U0 -- constraints.txt | grep '^[-+][^-+]' || echo "(nothing moved)"
