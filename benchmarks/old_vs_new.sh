#!/usr/bin/env bash
# Old code against this checkout on one GPU, interleaved old/new/old/new, random-weight SD1.5, bf16, 512 px:
#   the training step alone (profile_step.py: a bank of 30 subjects eager, one subject CUDA-graphed, 10 steps each),
#   then the train command with its defaults for one subject (whole process, it/s, peak memory).
# REPEATS (default 2) step measurements and RUNS (default 2) command runs of each, interleaved.
# Set up beside the checkout (both ignored by git), then carry .whl and .devdata; results land in $OUT:
#   git archive <old commit> dreambooth_singlora eval prompts scripts | tar -x -C .devdata/old
#   cp -r <dreambooth dataset>/dog .devdata/dreambooth/
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OUT=${OUT:-/tmp/out}
M=/tmp/b/sd15-random
PYTHONPATH=/tmp/site:$PWD python3 -c "from dreambooth_singlora.testing import build_sd15_pipeline as b; b('$M', device='cuda')" \
  2>&1 | tail -1
root() { [ "$1" = old ] && echo .devdata/old || echo .; }
script() { [ "$1" = old ] && echo .devdata/old/scripts/profile_step.py || echo benchmarks/profile_step.py; }
step() {  # old|new SUBJECTS I
  local v=$([ "$2" = 1 ] && echo channels_last || echo default)  # the trainer's layout for each
  PYTHONPATH=/tmp/site:$(root "$1") python3 "$(script "$1")" --model $M --subjects "$2" --steps 10 --variants $v $v \
    --output "$OUT/step_$2_$1_$3.json" 2>&1 | grep -E "^(default|channels|Error|Traceback)" | sed "s/^/$1 $2 subjects: /"
}
for i in $(seq ${REPEATS:-2}); do step old 30 $i; step new 30 $i; done
for i in $(seq ${REPEATS:-2}); do step old 1 $i; step new 1 $i; done
ARGS="--pretrained_model_name_or_path $M --subject dog --dataset_dir .devdata/dreambooth --mixed_precision bf16 --report_to none"
PYTHONPATH=/tmp/site:$PWD python3 -m dreambooth_singlora.train_dreambooth $ARGS --output_dir /tmp/warm --max_train_steps 5 \
  2>&1 | grep -iE "error"
for i in $(seq ${RUNS:-2}); do for w in old new; do
  PYTHONPATH=/tmp/site:$(root $w) /usr/bin/time -f "%e" -o /tmp/wall python3 -m dreambooth_singlora.train_dreambooth $ARGS \
    --output_dir /tmp/run_${w}_$i > /tmp/log_${w}_$i 2>&1
  python3 -c "import json; d=json.load(open('/tmp/run_${w}_$i/train_stats.json')); d['whole_process_s']=float(open('/tmp/wall').read().split()[-1])
print('$w one subject: whole', d['whole_process_s'], 's, it/s', d['it_per_s'], ', peak', round(d['peak_gpu_memory_gb'], 2), 'GB')
json.dump(d, open('$OUT/one_${w}_$i.json', 'w'), indent=1)" || tail -5 /tmp/log_${w}_$i
done; done
