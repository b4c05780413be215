# The fourth pass of docs/BENCHMARKS.md "A whole run": the UNet in its own dtype (the default) against
# --autocast (the UNet under torch.autocast, as before), and the same run on transformers 5.24.
#   PART=step    the step alone (scripts/profile_step.py): one subject CUDA-graphed, a bank of 30 eager
#   PART=one     one subject, the command with its defaults against --autocast, interleaved, twice each;
#                then twice on transformers 5.24 (.devdata/tf524: what `pip install` resolves today, which
#                imports scikit-learn only when it is used) where it imports
#   PART=layout  the step again, channels-last against contiguous, now that the UNet runs without autocast
#   PART=multi   30 subjects x 400 SingLoRA steps (scripts/benchmark_multi.py), defaults then --autocast
#   PART=floor   a bank of 30 against one plain adapter for all 30 samples (no routing), eager and compiled
#                (a cold inductor cache): how fast a step of 30 could be with a perfect bank
#   PART=confirm one subject, the defaults, twice: the final code of the change, after the passes above
#   PART=render  the rendering UNet (fp16, batch 96) eager per SDPA backend, compiled stock and with a bank of
#                30 (scripts/benchmark_render_parts.py): the floor of 300,000 evaluations on this GPU
# PART="step one" (the default) or PART="layout multi"; run from the project root on the device machine with .whl and
# .devdata carried; results under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whl/*.whl | grep -v dreambooth_singlora) && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 || exit 1
unset PYTHONDONTWRITEBYTECODE  # the device machine sets it; a pip install writes bytecode at install time
PART=${PART:-step one}
M=/tmp/b/sd15-random
[[ $PART == render ]] || [ -f $M/model_index.json ] || python3 -c "from dreambooth_singlora.testing import build_sd15_pipeline as b; b('$M', device='cuda')" 2>&1 | tail -1

if [[ $PART == *step* ]]; then
  python3 scripts/profile_step.py --model $M --subjects 1 --variants channels_last channels_last+autocast \
    channels_last+sdpa_flash --output $OUT/step_1_autocast_h200.json 2>&1 | grep -E "^(channels|Error|Traceback)"
  python3 scripts/profile_step.py --model $M --subjects 30 --steps 10 --variants default autocast \
    --output $OUT/step_30_autocast_h200.json 2>&1 | grep -E "^(default|autocast|Error|Traceback)"
fi

if [[ $PART == *layout* ]]; then  # the first variant pays the process's one-time costs: channels_last twice
  python3 scripts/profile_step.py --model $M --subjects 1 --variants channels_last default channels_last \
    --output $OUT/step_1_layout_h200.json 2>&1 | grep -E "^(channels|default|Error|Traceback)"
  python3 scripts/profile_step.py --model $M --subjects 30 --steps 10 --variants default autocast channels_last \
    --output $OUT/step_30_layout_h200.json 2>&1 | grep -E "^(default|autocast|channels|Error|Traceback)"
fi

if [[ $PART == *floor* ]]; then
  python3 scripts/profile_step.py --model $M --subjects 30 --steps 10 --variants default one_adapter one_adapter+compile \
    --output $OUT/step_30_floor_h200.json 2>&1 | grep -E "^(default|one_adapter|Error|Traceback)"
fi

if [[ $PART == *render* ]]; then
  python3 scripts/benchmark_render_parts.py --variants default bank --output $OUT/render_parts_h200.json 2>&1 \
    | grep -E "^(unet|vae|png| +\(compile)|Error|Traceback"
fi

ARGS="--pretrained_model_name_or_path $M --subject dog --dataset_dir .devdata/dreambooth --mixed_precision bf16 --report_to none"
one_run() {  # one_run NAME [flags]: a whole one-subject run as a user starts it, timed by /usr/bin/time
  local name=$1; shift
  /usr/bin/time -f "%e" -o /tmp/wall python3 -m dreambooth_singlora.train_dreambooth $ARGS --output_dir /tmp/run_$name "$@" > /tmp/log_$name 2>&1
  python3 -c "import json; d=json.load(open('/tmp/run_$name/train_stats.json')); d['whole_process_s']=float(open('/tmp/wall').read().split()[-1]); d['variant']='$name'
print('$name: whole', d['whole_process_s'], 'it/s', d['it_per_s'], 'peak', round(d['peak_gpu_memory_gb'], 2), d['phases_seconds_from_process_start'])
json.dump(d, open('$OUT/autocast_$name.json', 'w'), indent=1)" || tail -5 /tmp/log_$name
}
if [[ $PART == *one* ]]; then
  python3 -m dreambooth_singlora.train_dreambooth $ARGS --output_dir /tmp/warm --max_train_steps 5 2>&1 | grep -iE "error"; echo "warm-up run done"
  for i in 1 2; do one_run default_$i; one_run autocast_$i --autocast; done
  OUT=$OUT python3 - <<'PY'
import json, itertools
from safetensors.torch import load_file
runs = ["default_1", "default_2", "autocast_1", "autocast_2"]
loss = {r: dict((s, l) for s, l in json.load(open(f"/tmp/run_{r}/train_stats.json"))["loss_history"]) for r in runs}
ad = {r: load_file(f"/tmp/run_{r}/adapter_model.safetensors") for r in runs}
out = {}
for a, b in itertools.combinations(runs, 2):
    rel = max(((ad[a][k] - ad[b][k]).norm() / ad[b][k].norm()).item() for k in ad[a])
    out[f"{a} vs {b}"] = {"loss_max_abs_diff": max(abs(loss[a][s] - loss[b][s]) for s in loss[a]),
                          "adapter_max_rel_diff": rel}
    print(a, "vs", b, out[f"{a} vs {b}"])
json.dump(out, open(__import__("os").environ["OUT"] + "/autocast_compare.json", "w"), indent=1)
PY
  # transformers 5.24 in front of the machine's 5.17: alone, else with the hub and tokenizers it was built with
  for extra in "" "huggingface_hub tokenizers"; do
    rm -rf /tmp/s524; whls=.devdata/tf524/transformers-*.whl; for e in $extra; do whls="$whls $(ls .devdata/tf524/$e-*.whl)"; done
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/s524 $whls || continue
    PYTHONPATH=/tmp/s524:$PYTHONPATH python3 -c "import sys, transformers; from diffusers import UNet2DConditionModel; from transformers import CLIPTextModel; import peft
print('transformers', transformers.__version__, 'sklearn imported:', 'sklearn' in sys.modules)" && ok=1 && break
  done
  if [ -n "${ok:-}" ]; then
    export PYTHONPATH=/tmp/s524:$PYTHONPATH
    python3 -m dreambooth_singlora.train_dreambooth $ARGS --output_dir /tmp/warm524 --max_train_steps 5 2>&1 | grep -iE "error"
    for i in 1 2; do one_run tf524_$i; done
  else echo "transformers 5.24 does not import on this machine: not measured"; fi
fi

if [[ $PART == *confirm* ]]; then
  python3 -m dreambooth_singlora.train_dreambooth $ARGS --output_dir /tmp/warm --max_train_steps 5 2>&1 | grep -iE "error"
  for i in 1 2; do one_run confirm_$i; done
fi

if [[ $PART == *multi* ]]; then
  for v in default autocast; do
    flag=$([ $v = autocast ] && echo --autocast)
    /usr/bin/time -f "30 subjects ($v), whole process: %e s" python3 scripts/benchmark_multi.py --dataset_dir .devdata/dreambooth \
      --subjects all --render_images 0 --work_dir /tmp/b $flag --output $OUT/multi_autocast_$v.json 2>&1 | grep -E "training:|whole process|Error"
    cp /tmp/b/run/dog/train_stats.json $OUT/multi_autocast_${v}_dog_stats.json
  done
  python3 -c "
import json; a, b = (dict(map(tuple, json.load(open('$OUT/multi_autocast_%s_dog_stats.json' % v))['loss_history'])) for v in ('default', 'autocast'))
print('30 subjects, dog: loss max abs diff default vs autocast', max(abs(a[s] - b[s]) for s in a))"
fi
