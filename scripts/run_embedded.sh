#!/usr/bin/env bash
# The whole embedded grid in one command: every embedded experiment (captioning, VQA, zero-shot, tau and
# step-size ablations, runtime), then the tables and figures into results/embedded/.
#   bash scripts/run_embedded.sh              # sequential; add e.g. hydra/launcher=joblib to parallelise
# Finished runs are resumed (skipped), so re-running only regenerates the tables and figures.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-disabled}"
for exp in captioning vqa zero_shot tau_ablation step_ablation runtime; do
  uv run python run.py -m "experiment=embedded/${exp}" "$@"
done
runs=results/multiruns/embedded
out=results/embedded
uv run python scripts/tables.py "$runs/captioning" "$runs/vqa" "$runs/zero_shot" --out "$out/tables" --name main
uv run python scripts/tables.py "$runs/tau_ablation" --rows tau,strength --cols dataset,vlm --name tau_ablation --out "$out/tables"
uv run python scripts/tables.py "$runs/step_ablation" --rows step,strength --cols dataset,vlm --name step_ablation --out "$out/tables"
uv run python scripts/tables.py "$runs/runtime" --out "$out/tables" --name runtime
uv run python scripts/figures.py --main "$runs/captioning" "$runs/vqa" "$runs/zero_shot" --tau "$runs/tau_ablation" \
  --runtime "$runs/runtime" --out "$out/figures"
