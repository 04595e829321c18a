#!/usr/bin/env bash
# Set everything up and run the whole test suite (README command 2).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip --version >/dev/null 2>&1 || python3 -m ensurepip --upgrade
python3 -m pip install -q -c constraints.txt -e ".[test,main,notebooks]"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
python3 -m pytest -q -p no:cacheprovider "$@"
