# A warm one-subject run twice, the trainer's imports under -X importtime and profile_startup.py; then (unless
# SKIP_COMPILE is set) what torch.compile does for a 30-subject bank step with a cold and a warm inductor
# cache. Run from the project root on the device machine with .whl and .devdata carried; results under $OUT
# (docs/BENCHMARKS.md; scripts/gpu_startup_profile.sh samples a whole run with py-spy).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whl/*.whl | grep -v dreambooth_singlora) && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 || exit 1
unset PYTHONDONTWRITEBYTECODE
python3 -c "from dreambooth_singlora.testing import build_sd15_pipeline as b; b('/tmp/m', device='cuda')" 2>&1 | tail -1
TRAIN="python3 -m dreambooth_singlora.train_dreambooth --pretrained_model_name_or_path /tmp/m --subject dog --dataset_dir .devdata/dreambooth --mixed_precision bf16 --report_to none"
$TRAIN --output_dir /tmp/warm --max_train_steps 5 2>&1 | grep -iE "error" ; echo "warm-up run done"
for i in 1 2; do
  /usr/bin/time -f "whole process (run $i): %e s" $TRAIN --output_dir /tmp/r$i 2>&1 | grep -E "whole process|Error"
  python3 -c "import json; d=json.load(open('/tmp/r$i/train_stats.json')); print('run $i', d['it_per_s'], d['phases_seconds_from_process_start'])"
  cp /tmp/r$i/train_stats.json $OUT/train_stats_run$i.json
done
python3 -X importtime -c "import torch, accelerate; from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel; from transformers import CLIPTextModel, CLIPTokenizer" 2> $OUT/importtime.txt
python3 scripts/profile_startup.py --model /tmp/m --output $OUT/startup_warm.json 2>&1 | grep -vE "Loading|Warn|return Var" | tail -30
[ -n "$SKIP_COMPILE" ] && exit 0
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
for c in cold warm; do
  timeout $([ $c = cold ] && echo 220 || echo 130) python3 scripts/profile_step.py --model /tmp/m --subjects 30 --steps 10 --variants $([ $c = cold ] && echo default) compile \
    --output $OUT/step_30_compile_$c.json 2>&1 | grep -E "^(default|compile) " ; echo "compile ($c) rc $?"
done
