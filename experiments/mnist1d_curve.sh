#!/usr/bin/env bash
# The privacy-utility curve on MNIST-1D, end to end: a sweep over the noise
# multiplier (configs/experiment/mnist1d_curve.yaml), the non-private baseline
# of the same model and steps, and the report (table + plot), copied here.
#   bash experiments/mnist1d_curve.sh            (about 7 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-multirun/mnist1d_curve}
rm -rf "$OUT"
"$PY" -m dpjax.cli experiment=mnist1d_curve hydra.sweep.dir="$OUT" "$@"
"$PY" -m dpjax.cli experiment=mnist1d_curve dp=none hydra.mode=RUN hydra.run.dir="$OUT/baseline" "$@"
"$PY" -m dpjax.report "$OUT"
mkdir -p experiments/mnist1d_curve
cp "$OUT"/results.md "$OUT"/results.csv "$OUT"/privacy_utility.png experiments/mnist1d_curve/
