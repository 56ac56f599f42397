#!/usr/bin/env bash
# Every trained drafter for the embedded SmolLM2-135M-Instruct, from scratch, one job after another (each
# resumes where it stopped when the script is run again):
#   bash scripts/train_heads_smollm2.sh
# The shared self-distillation data, then the Hydra++ heads (shipped: spec_jax/heads/hydra_smollm2), the
# EAGLE-1 and EAGLE-3 drafts (results/heads/eagle{1,3}_smollm2; the one with the higher held-out real tau is
# copied to spec_jax/heads/eagle_smollm2, the shipped default). Medusa's heads have their own smaller data
# job (configs/medusa_smollm2.yaml says how).
set -euo pipefail
cd "$(dirname "$0")/.."
python train/make_data.py --config configs/data_smollm2.yaml --out results/data_smollm2
for recipe in hydra eagle1 eagle3; do
  python train/train_heads.py --config "configs/${recipe}_smollm2.yaml"
done
python - <<'PY'
import json, shutil
from pathlib import Path

tau = {v: json.loads(Path(f"results/heads/{v}_smollm2/config.json").read_text())["metrics"]["real_tau"]
       for v in ("eagle1", "eagle3")}
best = max(tau, key=tau.get)
print(f"real tau {tau}: shipping {best}")
shutil.copytree(f"results/heads/{best}_smollm2", "spec_jax/heads/eagle_smollm2", dirs_exist_ok=True)
for f in ("metrics.jsonl", "loss.png"):
    shutil.copy(f"results/train_{best}_smollm2/{f}", "spec_jax/heads/eagle_smollm2/")
PY
for name in hydra eagle; do  # the data manifest and the training curve travel with the shipped drafts
  cp results/data_smollm2/manifest.json "spec_jax/heads/${name}_smollm2/data_manifest.json"
done
cp results/train_hydra_smollm2/{metrics.jsonl,loss.png} spec_jax/heads/hydra_smollm2/
# Issue 13's trained drafters, on the same data: the distilled draft model (its recipe writes straight to
# spec_jax/heads/draft_smollm2), the early-exit adapters, the SpecDec++ acceptance head (for that draft) and
# the AdaEAGLE draft-structure predictors (for the shipped EAGLE and the distilled draft).
for recipe in draft early_exit specdecpp; do
  python train/train_heads.py --config "configs/${recipe}_smollm2.yaml"
  cp "results/train_${recipe}_smollm2/"{metrics.jsonl,loss.png} "spec_jax/heads/${recipe}_smollm2/"
  cp results/data_smollm2/manifest.json "spec_jax/heads/${recipe}_smollm2/data_manifest.json"
done
for method in eagle draft; do
  python train/train_heads.py --config "configs/structure_${method}_smollm2.yaml"
  rm -rf "spec_jax/heads/structure_${method}_smollm2"
  cp -r "results/heads/structure_${method}_smollm2" spec_jax/heads/
  cp "results/train_structure_${method}_smollm2/"{metrics.jsonl,loss.png} "spec_jax/heads/structure_${method}_smollm2/"
  cp results/data_smollm2/manifest.json "spec_jax/heads/structure_${method}_smollm2/data_manifest.json"
done
