# Issue 11's "no speed is lost" for the fifth size pass (docs/BENCHMARKS.md "The size pass"): the code before it
# (e234800, unpacked in .devdata/old by `git archive e234800 dreambooth_singlora scripts eval prompts pyproject.toml
# | tar -x -C .devdata/old`) against now, on one H200 with random-weight SD1.5, interleaved old/new/old/new:
#   the step alone (scripts/profile_step.py): a bank of 30 eager (what the bank processors' change touches) and one
#   subject CUDA-graphed; then the command with its defaults for one subject, twice, and 30 subjects x 400 steps
#   (scripts/benchmark_multi.py) once, on the new code. Carry .whl and .devdata; results under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whl/*.whl | grep -v dreambooth_singlora) && export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 || exit 1
unset PYTHONDONTWRITEBYTECODE
M=/tmp/b/sd15-random
PYTHONPATH=/tmp/site:$PWD python3 -c "from dreambooth_singlora.testing import build_sd15_pipeline as b; b('$M', device='cuda')" 2>&1 | tail -1
step() {  # step old|new SUBJECTS I
  local root=$([ $1 = old ] && echo .devdata/old || echo .)
  local v=$([ $2 = 1 ] && echo channels_last || echo default)  # the trainer's layout for each (see --channels_last)
  PYTHONPATH=/tmp/site:$root python3 $root/scripts/profile_step.py --model $M --subjects $2 --steps 10 --variants $v $v --output $OUT/size_step_$2_$1_$3.json 2>&1 | grep -E "^(default|channels|Error|Traceback)" | sed "s/^/$1 $2 subjects: /"
}
for i in 1 2; do step old 30 $i; step new 30 $i; done
for i in 1 2; do step old 1 $i; step new 1 $i; done
export PYTHONPATH=/tmp/site:$PWD
ARGS="--pretrained_model_name_or_path $M --subject dog --dataset_dir .devdata/dreambooth --mixed_precision bf16 --report_to none"
python3 -m dreambooth_singlora.train_dreambooth $ARGS --output_dir /tmp/warm --max_train_steps 5 2>&1 | grep -iE "error"
for i in 1 2; do
  /usr/bin/time -f "%e" -o /tmp/wall python3 -m dreambooth_singlora.train_dreambooth $ARGS --output_dir /tmp/run_$i > /tmp/log_$i 2>&1
  python3 -c "import json; d=json.load(open('/tmp/run_$i/train_stats.json')); d['whole_process_s']=float(open('/tmp/wall').read().split()[-1])
print('one subject: whole', d['whole_process_s'], 'it/s', d['it_per_s'], 'peak', round(d['peak_gpu_memory_gb'], 2))
json.dump(d, open('$OUT/size_one_$i.json', 'w'), indent=1)" || tail -5 /tmp/log_$i
done
/usr/bin/time -f "30 subjects, whole process: %e s" python3 scripts/benchmark_multi.py --dataset_dir .devdata/dreambooth \
  --subjects all --render_images 0 --work_dir /tmp/b --output $OUT/size_multi.json 2>&1 | grep -E "training:|whole process|Error"
