# The 30-subject run's time outside its loop, before the one-trainer redesign (ad46e78, unpacked in .old by
# `git archive ad46e78 dreambooth_singlora scripts eval prompts | tar -x -C .old`) and now, in one call, at
# --steps 100 (the loop's speed is known; what differs is outside it). Carry .whl, .devdata and .old.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whl/*.whl | grep -v dreambooth_singlora) || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1; unset PYTHONDONTWRITEBYTECODE
PYTHONPATH=/tmp/site:$PWD python3 -c "from dreambooth_singlora.testing import build_sd15_pipeline as b; b('/tmp/b/sd15-random', device='cuda')" 2>&1 | tail -1
PYTHONPATH=/tmp/site /usr/bin/time -f "before: whole process %e s" python3 .old/scripts/benchmark_multi.py --dataset_dir .devdata/dreambooth \
  --steps 100 --render_images 0 --work_dir /tmp/b --output $OUT/old_multi_100.json 2>&1 | grep -E "training:|whole process|Error"
PYTHONPATH=/tmp/site:$PWD /usr/bin/time -f "now: whole process %e s" python3 scripts/benchmark_multi.py --dataset_dir .devdata/dreambooth \
  --subjects all --steps 100 --render_images 0 --work_dir /tmp/b --output $OUT/new_multi_100.json 2>&1 | grep -E "training:|whole process|Error"
