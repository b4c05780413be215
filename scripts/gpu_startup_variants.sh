# A one-subject run with start-up and exit variants, interleaved, twice each (docs/BENCHMARKS.md). The
# figures there were measured on commit ab85328, which still had a cache of
# importlib.metadata.packages_distributions (errors.scan_packages_once, taken out since: no gain):
#   before     main(argv) returns and the interpreter tears down (no fast exit)
#   command    `python -m dreambooth_singlora.train_dreambooth`, the defaults (--fast_exit)
#   flash      as `command` (through the wrapper below) with SDPA held to flash attention (cuDNN's attention
#              builds its kernels at the first call of each shape, in the first CUDA-graph capture)
# ("cache", the cache alone, was a fourth variant then; on today's code it is `before`.)
# Run from the project root on the device machine with .whl and .devdata carried; results under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whl/*.whl | grep -v dreambooth_singlora) && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 || exit 1
unset PYTHONDONTWRITEBYTECODE  # the device machine sets it; a pip install writes bytecode at install time
python3 -c "from dreambooth_singlora.testing import build_sd15_pipeline as b; b('/tmp/m', device='cuda')" 2>&1 | tail -1
cat > /tmp/variant.py <<'PY'
import contextlib, os, sys
v = os.environ.get("VARIANT", "")
from dreambooth_singlora.train_dreambooth import main
ctx = contextlib.nullcontext()
if v == "flash":
    from torch.nn.attention import SDPBackend, sdpa_kernel
    ctx = sdpa_kernel([SDPBackend.FLASH_ATTENTION])
with ctx:
    main(sys.argv[1:], own_process=v != "before")  # own_process: --fast_exit applies, as under python -m
PY
ARGS="--pretrained_model_name_or_path /tmp/m --subject dog --dataset_dir .devdata/dreambooth --mixed_precision bf16 --report_to none"
python3 /tmp/variant.py $ARGS --output_dir /tmp/warm --max_train_steps 5 2>&1 | grep -iE "error"; echo "warm-up run done"
for i in 1 2; do for v in before command flash; do
  out=/tmp/run_${v}_$i
  [ $v = command ] && run="python3 -m dreambooth_singlora.train_dreambooth" || run="python3 /tmp/variant.py"
  VARIANT=$v /usr/bin/time -f "%e" -o /tmp/wall $run $ARGS --output_dir $out > /dev/null 2>&1
  python3 -c "import json; d=json.load(open('$out/train_stats.json')); d['whole_process_s']=float(open('/tmp/wall').read().split()[-1]); d['variant']='$v'
print('$v run $i: whole', d['whole_process_s'], 'it/s', d['it_per_s'], d['phases_seconds_from_process_start'])
json.dump(d, open('$OUT/startup_variant_${v}_$i.json', 'w'), indent=1)"
done; done
