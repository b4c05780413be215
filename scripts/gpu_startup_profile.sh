# Where a warm one-subject run's time goes outside its loop: two plain runs, one that ends with os._exit
# (what process teardown costs), one sampled by py-spy over every thread (idle included; raw stacks
# gzipped) and one under cProfile. Run from the project root on the device machine with .whl (py-spy
# among its wheels) and .devdata carried; results under $OUT (docs/BENCHMARKS.md).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whl/*.whl | grep -v dreambooth_singlora) && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 || exit 1
unset PYTHONDONTWRITEBYTECODE  # the device machine sets it; a pip install writes bytecode at install time
python3 -c "from dreambooth_singlora.testing import build_sd15_pipeline as b; b('/tmp/m', device='cuda')" 2>&1 | tail -1
ARGS="--pretrained_model_name_or_path /tmp/m --subject dog --dataset_dir .devdata/dreambooth --mixed_precision bf16 --report_to none"
python3 -m dreambooth_singlora.train_dreambooth $ARGS --output_dir /tmp/warm --max_train_steps 5 2>&1 | grep -iE "error"; echo "warm-up run done"
stats() { python3 -c "import json; d=json.load(open('$1/train_stats.json')); print('$2', d['it_per_s'], d['phases_seconds_from_process_start'])"; }
for i in 1 2; do
  /usr/bin/time -f "whole process (plain $i): %e s" python3 -m dreambooth_singlora.train_dreambooth $ARGS --output_dir /tmp/p$i 2>&1 | grep -E "whole process|Error"
  stats /tmp/p$i "plain $i"
  /usr/bin/time -f "whole process (os._exit $i): %e s" python3 -c "import os, sys; from dreambooth_singlora.train_dreambooth import main
main(sys.argv[1:]); sys.stdout.flush(); sys.stderr.flush(); os._exit(0)" $ARGS --output_dir /tmp/x$i 2>&1 | grep -E "whole process|Error"
  stats /tmp/x$i "os._exit $i"
done
/tmp/site/bin/py-spy record --idle --threads --rate 100 --format raw -o /tmp/pyspy.txt -- python3 -m dreambooth_singlora.train_dreambooth $ARGS --output_dir /tmp/s 2>&1 | grep -E "Error|error|Samples"
gzip -c /tmp/pyspy.txt > $OUT/train_pyspy_raw.txt.gz; stats /tmp/s "under py-spy"
python3 -m cProfile -o /tmp/train.prof -m dreambooth_singlora.train_dreambooth $ARGS --output_dir /tmp/c > /dev/null 2>&1; stats /tmp/c "under cProfile"
python3 -c "
import pstats; s=pstats.Stats('/tmp/train.prof'); s.sort_stats('cumulative').print_stats(90); s.sort_stats('tottime').print_stats(40)" | cut -c1-220 > $OUT/train_cprofile.txt
cp /tmp/p1/train_stats.json $OUT/train_stats_plain1.json; cp /tmp/x1/train_stats.json $OUT/train_stats_exit1.json
