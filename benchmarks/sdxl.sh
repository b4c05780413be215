#!/usr/bin/env bash
# SDXL at 1024 px on one GPU: full-size SDXL-base architecture with random weights (testing.build_sdxl_pipeline),
# batch 1, bf16, rank 8 on to_q/to_k, beside diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py.
#   PART=vs     this tool with --gradient_checkpointing (100 steps: the 12 GB fit) and with its defaults (400 steps),
#               diffusers' script restricted to to_q/to_k (400 steps), then check_graphed_checkpointing.py
#   PART=more   several subjects in one batch (1, 4, 8, 16: the training step alone, benchmarks/profile_step.py),
#               this tool again (400 steps, the baseline of this call) and diffusers' script on its default targets
#               (STEPS, 200 by default: its it/s is its bar's)
#   PART=flops  the UNet's FLOPs per sample (torch.utils.flop_counter) and a dense bf16 matmul's rate
#   PART=theirs diffusers' script on to_q/to_k alone, STEPS steps
#   PART=ours   the 2026-12-07 pass: this tool 100 steps, checkpointed 50 steps, then the FLOPs
# Set up (ignored by git), then carry .whl and .devdata:
#   .devdata/dreambooth/<subject>/ photos; .devdata/anchors/train_dreambooth_lora_sdxl.py (unchanged) and
#   train_dreambooth_lora_sdxl_qk.py (its unet_target_modules line set to ["to_k", "to_q"]).
# Peak memory: torch's max_memory_allocated for this tool (train_stats.json) and, for both, the most the GPU
# showed in use (nvidia-smi every 200 ms, which includes the CUDA context and the allocator's cache).
set -u
case ${PART:-vs} in vs|more|flops|theirs|ours) ;; *) echo "unknown PART=$PART: vs, more, flops, theirs or ours" >&2; exit 2 ;; esac
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:$PWD OUT=${OUT:-/tmp/out} M=/tmp/b/sdxl-random
[ -f $M/model_index.json ] || python3 -c "from dreambooth_singlora.testing import build_sdxl_pipeline as b; import torch
b('$M', device='cuda', dtype=torch.float16)" 2>&1 | tail -1
watch_gpu() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$1" & echo $!; }
peak() { sort -n "$1" | tail -1; }
ours() {  # NAME ARGS...
  local name=$1; shift; local w=$(watch_gpu /tmp/smi_$name)
  /usr/bin/time -f "%e" -o /tmp/wall_$name python3 -m dreambooth_singlora.train_dreambooth --pretrained_model_name_or_path $M \
    --subject dog --dataset_dir .devdata/dreambooth --mixed_precision bf16 --report_to none --output_dir /tmp/$name "$@" \
    > /tmp/log_$name 2>&1; kill $w
  python3 -c "import json; d=json.load(open('/tmp/$name/train_stats.json')); d['whole_process_s']=float(open('/tmp/wall_$name').read().split()[-1]); d['nvidia_smi_peak_mib']=int('$(peak /tmp/smi_$name)')
print('$name: whole', d['whole_process_s'], 's, loop', d['loop_seconds'], 's,', d['it_per_s'], 'it/s, peak', round(d['peak_gpu_memory_gb'], 2), 'GB allocated,', d['nvidia_smi_peak_mib'], 'MiB in use')
json.dump(d, open('$OUT/$name.json', 'w'), indent=1)" || tail -20 /tmp/log_$name
}
theirs() {  # NAME SCRIPT STEPS
  local w=$(watch_gpu /tmp/smi_$1)
  /usr/bin/time -f "%e" -o /tmp/wall_$1 accelerate launch --mixed_precision bf16 --num_processes 1 --num_machines 1 \
    --dynamo_backend no .devdata/anchors/$2 --pretrained_model_name_or_path $M --instance_data_dir .devdata/dreambooth/dog \
    --instance_prompt "a photo of sks dog" --resolution 1024 --train_batch_size 1 --max_train_steps $3 --rank 8 \
    --learning_rate 1e-4 --lr_scheduler constant --lr_warmup_steps 0 --mixed_precision bf16 --seed 0 \
    --output_dir /tmp/$1 --checkpointing_steps 100000 > /tmp/log_$1 2>&1; kill $w
  local bar=$(tr '\r' '\n' < /tmp/log_$1 | grep -E "^Steps: 100%" | tail -1)
  echo "$1: whole $(cat /tmp/wall_$1) s, peak $(peak /tmp/smi_$1) MiB in use, last bar: $bar"
  [ -n "$bar" ] || tail -20 /tmp/log_$1
  cp /tmp/log_$1 $OUT/$1.log
}
flops() {
  python3 - <<'PY'
import json, os, time, torch
from torch.utils.flop_counter import FlopCounterMode
from diffusers import UNet2DConditionModel
unet = UNet2DConditionModel.from_pretrained(os.environ["M"], subfolder="unet", torch_dtype=torch.bfloat16).cuda()
unet.requires_grad_(False)
dt, c = torch.bfloat16, unet.config
x = torch.randn(1, 4, 128, 128, device="cuda", dtype=dt, requires_grad=True)
kw = dict(encoder_hidden_states=torch.randn(1, 77, 2048, device="cuda", dtype=dt), added_cond_kwargs={
    "text_embeds": torch.randn(1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, device="cuda", dtype=dt),
    "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], device="cuda", dtype=dt)})
t = torch.tensor([500], device="cuda")
with FlopCounterMode(display=False) as f:
    out = unet(x, t, **kw).sample
fwd = f.get_total_flops()
with FlopCounterMode(display=False) as f:
    unet(x, t, **kw).sample.float().square().mean().backward()
both = f.get_total_flops()
a = torch.randn(8192, 8192, device="cuda", dtype=dt); b = torch.randn(8192, 8192, device="cuda", dtype=dt)
for _ in range(5): a @ b
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(50): a @ b
torch.cuda.synchronize(); rate = 50 * 2 * 8192**3 / (time.perf_counter() - t0)
d = {"unet_forward_tflop_per_sample": fwd / 1e12, "unet_forward_backward_to_input_tflop_per_sample": both / 1e12,
     "dense_bf16_matmul_tflops": rate / 1e12, "gpu": torch.cuda.get_device_name()}
print(json.dumps(d)); json.dump(d, open(os.environ["OUT"] + "/sdxl_flops.json", "w"), indent=1)
PY
}
bank() {  # the training step alone; one subject checkpointed both graphed (not the trainer's path yet) and eager
  for n in 1 4 8 16; do
    case $n in 1) v="default checkpointing checkpointing+eager" ;; 16) v="checkpointing" ;; *) v="default checkpointing" ;; esac
    python3 benchmarks/profile_step.py --model $M --subjects $n --steps 5 --variants $v \
      --output $OUT/sdxl_bank_$n.json 2>&1 | grep -E "^(default|checkpointing|Error|Traceback|torch.OutOfMemory)" | sed "s/^/$n subjects: /"
  done
}
check() {  # can the checkpointed UNet be graphed, with the eager gradients? (tiny SD1.5 and SDXL, fp32)
  python3 benchmarks/check_graphed_checkpointing.py --output $OUT/check_graphed_checkpointing.json \
    > /tmp/log_check 2>&1 || tail -20 /tmp/log_check
  grep -E "^(sd15|sdxl) " /tmp/log_check
}
vs() {  # the first run also warms the machine's caches
  ours sdxl_ours_gc --max_train_steps 100 --gradient_checkpointing
  ours sdxl_ours --max_train_steps 400
  theirs sdxl_diffusers_qk train_dreambooth_lora_sdxl_qk.py 400
  check
}
more() {
  bank
  ours sdxl_ours_b --max_train_steps 400
  theirs sdxl_diffusers_default train_dreambooth_lora_sdxl.py ${STEPS:-200}
}
case ${PART:-vs} in
vs) vs ;;
more) more ;;
flops) flops ;;
theirs) theirs sdxl_diffusers_qk_${STEPS:-400} train_dreambooth_lora_sdxl_qk.py ${STEPS:-400} ;;
ours) ours sdxl_ours_100 --max_train_steps 100; ours sdxl_ours_gc_50 --max_train_steps 50 --gradient_checkpointing; flops ;;
esac
