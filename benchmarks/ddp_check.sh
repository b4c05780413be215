#!/bin/bash
# Multi-GPU DreamBooth run through accelerate (DDP) on random-weight SD1.5, then checks.
set -x
python - <<'PY'
from dreambooth_singlora.testing import build_sd15_pipeline
build_sd15_pipeline("/tmp/sd15", device="cuda")
PY
nvidia-smi --query-gpu=name --format=csv
accelerate launch --num_processes 2 --multi_gpu --mixed_precision bf16 -m dreambooth_singlora.train_dreambooth \
  --pretrained_model_name_or_path /tmp/sd15 --subject dog --dataset_dir "${DATASET:-.devdata/dreambooth}" --output_dir /tmp/ddp \
  --max_train_steps 100 --checkpointing_steps 50 --mixed_precision bf16 --ramp_steps 40 --log_every 10 2>&1 | tail -5
accelerate launch --num_processes 1 --mixed_precision bf16 -m dreambooth_singlora.train_dreambooth \
  --pretrained_model_name_or_path /tmp/sd15 --subject backpack --dataset_dir "${DATASET:-.devdata/dreambooth}" --output_dir /tmp/ads/backpack \
  --max_train_steps 100 --mixed_precision bf16 --report_to none --no-cuda_graphs 2>&1 | tail -2
cp -r /tmp/ddp /tmp/ads/dog
find /tmp/ddp -maxdepth 3 | sort | grep -v events
python - <<'PY'
import json, glob
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
c = json.load(open("/tmp/ddp/adapter_config.json")); s = json.load(open("/tmp/ddp/train_stats.json"))
print("adapter step", c["step"], "u", c["u"], "stats", s)
ea = EventAccumulator(glob.glob("/tmp/ddp/logs/**/events.out.tfevents*", recursive=True)[0]); ea.Reload()
print("u by step", [(e.step, round(e.value, 3)) for e in ea.Scalars("u")])
print("loss by step", [(e.step, round(e.value, 4)) for e in ea.Scalars("loss")])
print("tmp leftovers", glob.glob("/tmp/ddp/**/*.tmp*", recursive=True))
PY
accelerate launch --num_processes 2 --multi_gpu -m dreambooth_singlora.eval render --adapters /tmp/ads --output /tmp/imgs --subjects dog backpack \
  --max_prompts 2 --num_inference_steps 20 --num_images_per_prompt 2 2>&1 | grep -v it/s | tail -3
find /tmp/imgs -name "*.png" | wc -l
cp /tmp/imgs/dog/contact_sheet.png $OUT/ddp_dog_contact_sheet.png; cp /tmp/ddp/loss_curve.png $OUT/ddp_loss_curve.png
cp /tmp/ddp/adapter_config.json /tmp/ddp/train_stats.json $OUT/
