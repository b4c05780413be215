# Where a whole run's time goes on the GPU machine (docs/BENCHMARKS.md "Where a one-subject run's time goes").
# Run from the project root on the device machine with .whl and .devdata carried; results under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whl/*.whl | grep -v dreambooth_singlora) && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 || exit 1
python3 -c "from dreambooth_singlora.testing import build_sd15_pipeline as b; import torch; b('/tmp/m', device='cuda')" 2>&1 | tail -1
python3 scripts/profile_startup.py --model /tmp/m --profile_first --output $OUT/startup_profiled.json 2>&1 | grep -v Loading | tail -60
python3 scripts/profile_startup.py --model /tmp/m --eager_first --output $OUT/startup_eager_first.json 2>&1 | grep -E "eager|capture|CUDA start"
TORCH_CUDNN_V8_API_DISABLED=1 python3 scripts/profile_startup.py --model /tmp/m --eager_first --output $OUT/startup_cudnn_v7.json 2>&1 | grep -E "eager|capture"
/usr/bin/time -v python3 -m cProfile -o $OUT/train.prof -m dreambooth_singlora.train_dreambooth --pretrained_model_name_or_path /tmp/m --subject dog --dataset_dir .devdata/dreambooth --output_dir /tmp/r1 --mixed_precision bf16 --report_to none 2>&1 | grep -E "Elapsed|Maximum resident|Error|error" 
python3 -c "
import pstats; s=pstats.Stats('$OUT/train.prof'); s.sort_stats('cumulative').print_stats(45); s.sort_stats('tottime').print_stats(25)" | cut -c1-200
cat /tmp/r1/train_stats.json | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['it_per_s'], d['phases_seconds_from_process_start'])"
