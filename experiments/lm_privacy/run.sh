#!/usr/bin/env bash
# Language models under DP (issue 15): bits per byte on the private test split and Secret
# Sharer exposure of canaries inserted 1, 4 and 16 times, for
#   no fine-tuning (the public pre-trained model), non-private full fine-tuning, and
#   DP fine-tuning (LoRA rank 8, and full) at each target epsilon,
# each fine-tune repeated for every audit seed (fresh canaries, a fresh run secret).
#
#   bash experiments/lm_privacy/run.sh                 the study (hours on 2 CPU cores)
#   REDUCED=1 bash experiments/lm_privacy/run.sh       a smaller model, steps and space
#
# Every fine-tune is an `dpjax-audit audit=exposure` run: it trains the configured run with
# the canaries inserted (21 of ~1,620 training records) and reports the run's summary
# (test_bits_per_byte) with the exposures, so bits per byte and exposure come from the same
# models. Environment: SEEDS (audit.seed sweep, default 0,1,2), EPS (default 1,3,8),
# OUT (default experiments/lm_privacy/results), BIN (default .venv/bin), SOURCE (an
# existing pre-training run to fine-tune from: skips pre-training and the no-fine-tuning
# evaluation, e.g. to add seeds under OUT=<first OUT>/more; the table reads every
# audit.json under the directory it is given), SECRET_LENGTH (digits of the PIN: the
# candidate space is 10^SECRET_LENGTH; default 6, or 4 with REDUCED=1).
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-0,1,2}
EPS=${EPS:-1,3,8}
OUT=${OUT:-experiments/lm_privacy/results}
BIN=${BIN:-.venv/bin}
MODEL=()
PRETRAIN=()
FINETUNE=()
AUDIT=(audit.secret_length=${SECRET_LENGTH:-6})  # 10^6 PINs, every candidate ranked
if [ -n "${REDUCED:-}" ]; then
  MODEL=(model.options.num_layers=1 model.options.width=64 model.options.num_heads=2
         model.options.mlp_ratio=2 dataset.options.context_length=64)
  PRETRAIN=(train.steps=400 train.eval_every=400)
  FINETUNE=(train.steps=150 train.eval_every=150)
  AUDIT=(audit.secret_length=${SECRET_LENGTH:-4})  # 10^4 PINs
fi
mkdir -p "$OUT"
if [ -z "${SOURCE:-}" ]; then
  SOURCE="$(cd "$OUT" && pwd)/pretrain"
  "$BIN/dpjax-train" experiment=lm_pretrain "${MODEL[@]}" "${PRETRAIN[@]}" \
    hydra.run.dir="$SOURCE"
  "$BIN/python" experiments/lm_privacy/no_finetune.py "$SOURCE" "$OUT/no_finetune.json" \
    "${MODEL[@]}"
fi
COMMON=(audit=exposure "model.init_from=$SOURCE" "audit.seed=$SEEDS" "${MODEL[@]}"
        "${FINETUNE[@]}" "${AUDIT[@]}")
"$BIN/dpjax-audit" -m experiment=lm_nonprivate_finetune "${COMMON[@]}" \
  hydra.sweep.dir="$OUT/nonprivate"
"$BIN/dpjax-audit" -m experiment=lm_dp_finetune "${COMMON[@]}" "dp.target_epsilon=$EPS" \
  hydra.sweep.dir="$OUT/dp_lora"
"$BIN/dpjax-audit" -m experiment=lm_dp_finetune "${COMMON[@]}" "dp.target_epsilon=$EPS" \
  model.options.trainable=full model.options.lora_rank=0 hydra.sweep.dir="$OUT/dp_full"
if [ -f "$OUT/no_finetune.json" ]; then
  "$BIN/python" experiments/lm_privacy/table.py "$OUT"
fi
