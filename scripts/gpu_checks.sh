#!/bin/bash
# Short GPU runs of paths the CPU tests cannot reach: resume with CUDA graphs, fp16 (GradScaler) with graphs,
# gradient accumulation (eager), prior preservation (class images generated on the GPU), validation grids.
python - <<'PY'
from dreambooth_singlora.testing import build_sd15_pipeline
build_sd15_pipeline("/tmp/sd15", device="cuda")
PY
T="python -m dreambooth_singlora.train_dreambooth --pretrained_model_name_or_path /tmp/sd15 --subject dog --dataset_dir "${DATASET:-.devdata/dreambooth}" --report_to none --checkpointing_steps 30"
run() { echo "== $1"; shift; "$@" 2>&1 | grep -E "error|Error|Traceback|adapter saved|resumed" | head -5; }
run "graphs bf16, 60 steps" $T --output_dir /tmp/full --max_train_steps 60 --mixed_precision bf16
run "graphs bf16, 30 steps" $T --output_dir /tmp/half --max_train_steps 30 --mixed_precision bf16
run "graphs bf16, resume to 60" $T --output_dir /tmp/half --max_train_steps 60 --mixed_precision bf16 --resume_from_checkpoint latest
run "graphs fp16, 60 steps" $T --output_dir /tmp/fp16 --max_train_steps 60 --mixed_precision fp16
run "accumulation 2, bf16" $T --output_dir /tmp/acc --max_train_steps 20 --mixed_precision bf16 --gradient_accumulation_steps 2
run "prior + validation, bf16" $T --output_dir /tmp/prior --max_train_steps 20 --mixed_precision bf16 --with_prior_preservation --num_class_images 4 --validation_prompt "a sks dog" --validation_steps 10 --num_validation_images 2
python - <<'PY'
import json
from safetensors.torch import load_file
a, b = load_file("/tmp/full/adapter_model.safetensors"), load_file("/tmp/half/adapter_model.safetensors")
print("resume vs full, max relative diff:", max(((a[k]-b[k]).norm()/a[k].norm()).item() for k in a))
for d in ("full", "half", "fp16", "acc", "prior"):
    s = json.load(open(f"/tmp/{d}/train_stats.json")); c = json.load(open(f"/tmp/{d}/adapter_config.json"))
    print(d, "step", c["step"], "u", c["u"], "graphs", s["cuda_graphs"], "it/s", round(s["it_per_s"], 1))
import glob; print("class images", len(glob.glob("/tmp/prior/class_images/*.png")), "validation", sorted(glob.glob("/tmp/prior/validation/*")))
h = json.load(open("/tmp/fp16/checkpoints/checkpoint-60/trainer_state.json"))["history"]; print("fp16 loss", h[-3:])
PY
