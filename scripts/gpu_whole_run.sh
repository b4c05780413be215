# The whole-run benchmarks of docs/BENCHMARKS.md "A whole run (2026-12, second pass)": one subject three
# times (twice with the defaults, once with a variant), then 30 subjects x 400 steps twice. Run from the
# project root on the device machine with .whl and .devdata carried; results under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whl/*.whl | grep -v dreambooth_singlora) && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 || exit 1
unset PYTHONDONTWRITEBYTECODE  # the device machine sets it; a pip install writes bytecode at install time
python3 scripts/benchmark.py --dataset_dir .devdata/dreambooth --subject dog --methods singlora --eager_methods \
  --skip_unet_alone --warmup --repeats 2 --variant=--no-channels_last --work_dir /tmp/b --output $OUT/benchmark_whole_run.json 2>&1 | grep -v "^{" | tail -12
for i in $([ -z "$SKIP_MULTI" ] && echo 1 2); do
  /usr/bin/time -f "30 subjects, whole process: %e s" python3 scripts/benchmark_multi.py --dataset_dir .devdata/dreambooth --subjects all \
    --render_images 0 --work_dir /tmp/b --output $OUT/benchmark_multi_$i.json 2>&1 | grep -E "training:|whole process|Error"
  python3 -c "import json; d=json.load(open('/tmp/b/run/dog/train_stats.json')); print('phases', d['phases_seconds_from_process_start'])"
done
