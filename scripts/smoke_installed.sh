#!/usr/bin/env bash
# Smoke test of an installed dreambooth-singlora (a wheel in a clean venv), run from a folder outside
# the checkout: the python and dreambooth-singlora on PATH are the installed ones.
#     scripts/smoke_installed.sh DATASET_DIR        (a folder of <subject>/NN.jpg holding dog/)
# Builds a tiny random pipeline and tiny CLIP / DINO, then: train 2 steps on --subject dog, generate,
# export, eval score. Fails loudly on the first step that does.
set -euo pipefail
DATA=$(cd "${1:?usage: smoke_installed.sh DATASET_DIR}" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dbsl-smoke.XXXXXX")
cd "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1
unset PYTHONPATH
STEP=start
trap 'echo "SMOKE: FAILED at step: $STEP (in $WORK)" >&2' ERR
step() { STEP=$1; printf '\n--- smoke: %s (%s)\n' "$1" "$(date +%T)"; }

step "installed package, not the checkout; no top-level module but dreambooth_singlora"
python - <<'PY'
import importlib.metadata as md, importlib.util, sys, sysconfig
from pathlib import Path

import dreambooth_singlora, dreambooth_singlora.eval
from dreambooth_singlora.prompts import prompts_dir, subjects

site = Path(sysconfig.get_paths()["purelib"]).resolve()
for mod in (dreambooth_singlora, dreambooth_singlora.eval):
    assert site in Path(mod.__file__).resolve().parents, f"{mod.__name__} comes from {mod.__file__}, not {site}"
assert site in prompts_dir().resolve().parents and len(subjects()) == 30, prompts_dir()
assert importlib.util.find_spec("eval") is None, f"a top-level 'eval' is importable: {importlib.util.find_spec('eval')}"
files = md.files("dreambooth-singlora")
top = {f.parts[0] for f in files if f.parts[0] != ".."}  # ".." : the console script in bin/
dist = {t for t in top if t.endswith(".dist-info")}
assert top - dist == {"dreambooth_singlora"} and len(dist) == 1, sorted(top)
print(f"ok: {dreambooth_singlora.__file__}; prompts from {prompts_dir()}; top-level: {sorted(top)}")
PY

step "tiny pipeline and tiny encoders"
python - <<'PY'
from dreambooth_singlora.testing import build_tiny_pipeline
from dreambooth_singlora.eval.testing import save_tiny_clip, save_tiny_dino
print(build_tiny_pipeline("tiny-sd"), save_tiny_clip("clip"), save_tiny_dino("dino"))
PY

step "train 2 steps, --subject dog"
dreambooth-singlora train --pretrained_model_name_or_path tiny-sd --subject dog --dataset_dir "$DATA" \
    --output_dir adapter --max_train_steps 2 --resolution 32 --mixed_precision no --report_to none
test -f adapter/adapter_model.safetensors -a -f adapter/adapter_config.json

step "generate the dog's 25 prompts, 1 image each"
dreambooth-singlora generate --adapter adapter --subject dog --num_images_per_prompt 1 --num_inference_steps 2 \
    --height 32 --width 32 --output_dir images/dog
n=$(find images/dog -name '*.png' ! -name contact_sheet.png | wc -l)
[ "$n" -eq 25 ] || { echo "SMOKE: expected 25 images in images/dog, found $n" >&2; exit 1; }

step "export (kohya and diffusers layouts)"
dreambooth-singlora export --adapter adapter --format kohya --output dog-kohya.safetensors
dreambooth-singlora export --adapter adapter --format diffusers --output dog-diffusers.safetensors
test -s dog-kohya.safetensors -a -s dog-diffusers.safetensors

step "eval score"
dreambooth-singlora eval score --images images --dataset_dir "$DATA" --output scores --subjects dog \
    --clip_checkpoint clip --dino_checkpoint dino --no_progress
python - <<'PY'
import json
s = json.load(open("scores/scores.json"))
assert s["scored"]["images"] == 25 and s["summary"]["all"]["dino"]["n_images"] == 25, s["scored"]
print("ok:", s["scored"])
PY

step "a fidelity curve over 2 checkpoints of a run with a held-out photo (eval curve)"
dreambooth-singlora train --pretrained_model_name_or_path tiny-sd --subject dog --dataset_dir "$DATA" \
    --output_dir run --max_train_steps 2 --checkpointing_steps 1 --checkpoints_total_limit 0 --resolution 32 \
    --mixed_precision no --report_to none --holdout 1 --events run.jsonl
dreambooth-singlora eval curve --run run --output curve --dataset_dir "$DATA" --subjects dog --max_prompts 1 \
    --num_images_per_prompt 1 --num_inference_steps 2 --height 32 --width 32 --clip_checkpoint clip \
    --dino_checkpoint dino --no_progress
test -s curve/curve.csv -a -s curve/curve.png -a -s curve/curve.html
tail -1 run.jsonl | grep -q '"event": "finished"'

step "the Table 3 command and the web UI answer from the wheel (the UI without its [ui] extra: one line)"
dreambooth-singlora eval table3 --help > /dev/null
dreambooth-singlora ui --help > /dev/null
if python -c "import gradio" 2>/dev/null; then :; else
  code=0; dreambooth-singlora ui --workspace ui-ws > ui.out 2>&1 || code=$?
  [ "$code" -eq 2 ] && grep -q "\[ui\]" ui.out || { echo "SMOKE: ui without gradio: exit $code: $(cat ui.out)" >&2; exit 1; }
fi

STEP=done
echo "SMOKE: passed (work folder $WORK)"
rm -rf "$WORK"
