#!/usr/bin/env bash
# README command 1: set everything up, then run the main job, `curvfun compare`
# (every optimizer available in this build on scikit-learn's digits, MLP 64-128-10, ~2 minutes
# on 2 CPU cores). Extra arguments go to `curvfun compare`, e.g.
#   bash scripts/main.sh --optimizers sgd,kfac --steps 500 --out runs/kfac-vs-sgd
# The run folder (default runs/<timestamp>) holds results.md, metrics.csv, config.yaml and PNG plots.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip --version >/dev/null 2>&1 || python3 -m ensurepip --upgrade
python3 -m pip install -q -c constraints.txt -e ".[main]"
python3 -m curvfun compare "$@"
