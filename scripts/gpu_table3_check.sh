#!/bin/bash
# One-GPU end-to-end check of scripts/reproduce_table3.py at full size with random weights: SD1.5's
# architecture, and random-weight CLIP ViT-B/32 and DINO ViT-S/16 of the real architectures (the fidelity
# numbers mean nothing; the stage times, GPU use and the files do). Usage, from the repository root:
#   bash scripts/gpu_table3_check.sh OUT_DIR [subjects...]
# The package must be installed (pip install ., or its wheel on PYTHONPATH): `-m dreambooth_singlora.eval`
# is the installed name of eval/. STEPS sets the training steps (default 400).
# Writes OUT_DIR/table3_check.json (stage times, rerun time, file counts) and OUT_DIR/gpu_util.csv
# (nvidia-smi every second).
set -euo pipefail
OUT=${1:?usage: gpu_table3_check.sh OUT_DIR [subjects...]}; shift
SUBJECTS=${*:-dog cat backpack}
DATA=${DATASET:-.devdata/dreambooth}
WORK=/tmp/t3check
mkdir -p "$OUT"
python - <<'PY'
import os, torch
from safetensors.torch import save_file
from dreambooth_singlora.testing import build_sd15_pipeline
if not os.path.isfile("/tmp/sd15/model_index.json"):
    build_sd15_pipeline("/tmp/sd15", device="cuda")
import open_clip, timm
torch.manual_seed(0)
clip = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, "/tmp/clip_vitb32_random.safetensors")
dino = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0)
save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, "/tmp/dino_vits16_random.safetensors")
PY
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$OUT/gpu_util.csv" &
SMI=$!
trap 'kill $SMI 2>/dev/null || true' EXIT
run() {
  python scripts/reproduce_table3.py --pretrained_model_name_or_path /tmp/sd15 --dataset_dir "$DATA" \
    --work_dir "$WORK" --rows lora_r8 singlora_r8 --subjects $SUBJECTS --multi_subject --gpus 0 \
    --mixed_precision bf16 --max_train_steps "${STEPS:-400}" --max_prompts 2 --render_batch_size 16 \
    --clip_checkpoint /tmp/clip_vitb32_random.safetensors --dino_checkpoint /tmp/dino_vits16_random.safetensors
}
T0=$(date +%s.%N); run > "$OUT/first_run.log" 2>&1; T1=$(date +%s.%N)
run > "$OUT/rerun.log" 2>&1; T2=$(date +%s.%N)
python - "$OUT" "$T0" "$T1" "$T2" "$WORK" <<'PY'
import json, sys, glob, os
out, t0, t1, t2, work = sys.argv[1], *map(float, sys.argv[2:5]), sys.argv[5]
adapters = glob.glob(f"{work}/adapters/*/*/adapter_model.safetensors")
images = glob.glob(f"{work}/images/*/*/*/*.png")
scores = glob.glob(f"{work}/eval/*/scores.json")
res = {"first_run_seconds": round(t1 - t0, 1), "rerun_seconds": round(t2 - t1, 1), "adapters": len(adapters),
       "images": len(images), "score_files": len(scores), "table3_md": os.path.isfile(f"{work}/table3.md"),
       "rerun_log_tail": open(f"{out}/rerun.log").read()[-1500:]}
json.dump(res, open(f"{out}/table3_check.json", "w"), indent=2)
print(json.dumps(res, indent=2))
PY
grep -E "^\[|seconds|took" "$OUT/first_run.log" | tail -20 || true
cp "$WORK/table3.md" "$OUT/" 2>/dev/null || true
