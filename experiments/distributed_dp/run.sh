#!/usr/bin/env bash
# Distributed DP in the federated setting: central Gaussian vs Skellam vs distributed
# discrete Gaussian noise added by each SecAgg party, at several moduli 2^bits.
#
#   bash experiments/distributed_dp/run.sh [dataset] [seeds] [epsilons] [bits]
#
# defaults: mnist1d, seeds "0,1,2", epsilons "2,4,8", bits "12,14,16,18,20" (the issue's
# grid: 3 x 3 x (1 + 2 x 5) = 99 federated runs per dataset). Each run calibrates sigma to
# its target epsilon with its own accountant, so the comparison is at equal claimed epsilon.
# Writes the sweep under experiments/distributed_dp/<dataset>/ and its report there.
# EXTRA: more overrides for every run, space-separated (e.g. the reduced MNIST-1D study:
# EXTRA='model=mlp model.options.hidden=[128] dp.secagg_neighbours=8'); OUT: where to write.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATASET=${1:-mnist1d}
SEEDS=${2:-0,1,2}
EPS=${3:-2,4,8}
BITS=${4:-12,14,16,18,20}
OUT=${OUT:-experiments/distributed_dp/$DATASET}
BIN=${BIN:-.venv/bin}
COMMON=(experiment=mnist1d_fedavg "dataset=$DATASET" dp.randomness=seeded
        dp.noise_multiplier=null dp.aggregation=secagg dp.secagg_mode=simulation
        "train.seed=$SEEDS" "dp.target_epsilon=$EPS")
if [ -n "${EXTRA:-}" ]; then
  read -r -a EXTRA_ARGS <<< "$EXTRA"
  COMMON+=("${EXTRA_ARGS[@]}")
fi
if [ "$DATASET" = digits ]; then
  COMMON+=(model=mlp model.options.hidden=[64] federated.num_users=100
           federated.users_per_round=20)
fi
"$BIN/dpjax-train" -m "${COMMON[@]}" dp.noise=gaussian dp.secagg_bits=32 \
  "hydra.sweep.dir=$OUT/central"
"$BIN/dpjax-train" -m "${COMMON[@]}" dp.noise=skellam,ddgauss "dp.secagg_bits=$BITS" \
  "hydra.sweep.dir=$OUT/distributed"
"$BIN/dpjax-report" "$OUT"
"$BIN/python" experiments/distributed_dp/table.py "$OUT"
