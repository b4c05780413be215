"""Write checkpoints and adapters with the code of commit db8577c (before the trainer redesign).

Run with that commit's package first on the path, not today's: the imports below are db8577c's modules
(its dreambooth_singlora.train_multi was the many-subject trainer; today's package has no such module):
    mkdir /tmp/db8577c && git archive db8577c dreambooth_singlora prompts | tar -x -C /tmp/db8577c
    cd /tmp && PYTHONPATH=/tmp/db8577c python /path/to/checkout/tests/legacy/make_legacy.py   # -> /tmp/legacy/out
"""
import shutil, sys, json
from pathlib import Path
import torch
torch.set_num_threads(1)
from dreambooth_singlora.testing import build_tiny_pipeline
from dreambooth_singlora.config import TrainConfig
from dreambooth_singlora.train_dreambooth import train
import dreambooth_singlora.train_multi as TM

work = Path("/tmp/legacy/work"); shutil.rmtree(work, ignore_errors=True)
pipe = build_tiny_pipeline(work / "tiny")
data = str(Path(__file__).resolve().parents[1] / "data" / "dreambooth")  # the test photos
common = dict(pretrained_model_name_or_path=str(pipe), dataset_dir=data, resolution=32, max_train_steps=4,
              checkpointing_steps=2, checkpoints_total_limit=None, log_every=2, report_to="none", ramp_steps=3,
              rank=2, lr_scheduler="cosine", lr_warmup_steps=1, mixed_precision="no")
train(TrainConfig(**common, subject="dog", output_dir=str(work / "single")))
cfgs = TM.subject_configs(["dog", "cat"], dict(common, output_dir=str(work / "multi")))
# keep the bank checkpoint: train_multi removes a finished batch's checkpoints, so stop after step 2
import dreambooth_singlora.train_multi as T
orig = T.save_bank_checkpoint
def stop_after(*a, **k):
    out = orig(*a, **k)
    if a[6] == 2:
        raise KeyboardInterrupt
    return out
T.save_bank_checkpoint = stop_after
try:
    TM.train_multi(cfgs, str(work / "multi"))
except KeyboardInterrupt:
    pass
dest = Path("/tmp/legacy/out"); shutil.rmtree(dest, ignore_errors=True)
shutil.copytree(work / "single" / "checkpoints" / "checkpoint-2", dest / "single-checkpoint-2")
shutil.copytree(work / "multi" / "checkpoints" / "checkpoint-2", dest / "bank-checkpoint-2")
(dest / "adapter").mkdir()
for f in ("adapter_model.safetensors", "adapter_config.json"):
    shutil.copy(work / "single" / f, dest / "adapter" / f)
