# Per-step GPU time of one subject (CUDA graphs) and of a 30-subject bank (eager, compiled twice with one
# inductor cache), and what byte-compiled imports save. Run from the project root on the device machine
# with .whl carried; results under $OUT (docs/BENCHMARKS.md).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whl/*.whl | grep -v dreambooth_singlora) && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 || exit 1
python3 -c "import sys, os, torch; print('dont_write_bytecode', sys.flags.dont_write_bytecode, os.access(os.path.dirname(torch.__file__), os.W_OK))"
IMPORTS="import torch, diffusers; from diffusers import UNet2DConditionModel, AutoencoderKL; from transformers import CLIPTextModel, CLIPTokenizer; import accelerate, peft"
for run in plain pycache-cold pycache-warm; do
  [ $run = plain ] && unset PYTHONPYCACHEPREFIX || export PYTHONPYCACHEPREFIX=/tmp/pyc
  /usr/bin/time -f "imports ($run): %e s" python3 -c "$IMPORTS"
done
unset PYTHONPYCACHEPREFIX
python3 -c "from dreambooth_singlora.testing import build_sd15_pipeline as b; b('/tmp/m', device='cuda')" 2>&1 | tail -1
python3 scripts/profile_step.py --model /tmp/m --subjects 1 --variants default channels_last sdpa_flash sdpa_efficient sdpa_cudnn --output $OUT/step_1.json 2>&1 | grep -vi warn | tail -40
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
python3 scripts/profile_step.py --model /tmp/m --subjects 30 --variants ${VARIANTS_30:-default channels_last sdpa_flash sdpa_cudnn compile} --output $OUT/step_30.json 2>&1 | grep -vi warn | tail -40
[ -z "$SKIP_WARM_COMPILE" ] && python3 scripts/profile_step.py --model /tmp/m --subjects 30 --variants compile \
  --output $OUT/step_30_warm_cache.json 2>&1 | grep -E "^compile"
