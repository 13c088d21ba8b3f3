#!/usr/bin/env bash
# How tight is each audit? Claimed vs audited epsilon over a noise sweep on digits:
# the step audit (white-box, one step, R releases per world), the one-run audit
# (white-box and black-box scores of one training run) and LiRA membership inference.
#
#   bash experiments/audit_curve/run.sh [sigmas] [shadow_models]
#
# defaults: sigmas "0.5,1,2,4", 8 shadow models. Writes the sweep and its report
# (results.md with the audits table, audit.png: lower bound vs claim) under
# experiments/audit_curve/sweep, and copies table and plot next to this script.
set -euo pipefail
cd "$(dirname "$0")/../.."
SIGMAS=${1:-0.5,1,2,4}
SHADOWS=${2:-8}
OUT=experiments/audit_curve/sweep
BIN=${BIN:-.venv/bin}
COMMON=(experiment=digits_quick dp.randomness=seeded "dp.noise_multiplier=$SIGMAS")
"$BIN/dpjax-audit" -m "${COMMON[@]}" audit=step "hydra.sweep.dir=$OUT/step" || true
"$BIN/dpjax-audit" -m "${COMMON[@]}" audit=one_run audit.num_canaries=700 \
  "hydra.sweep.dir=$OUT/one_run" || true
"$BIN/dpjax-audit" -m "${COMMON[@]}" audit=mia "audit.shadow_models=$SHADOWS" \
  "hydra.sweep.dir=$OUT/mia" || true
"$BIN/dpjax-report" "$OUT"
cp "$OUT/results.md" experiments/audit_curve/results.md
cp "$OUT/audit.png" experiments/audit_curve/audit.png
