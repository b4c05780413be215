"""Reproduce the SingLoRA paper's Table 3: a thin caller of `dreambooth-singlora eval table3`.

    python scripts/reproduce_table3.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset_dir dreambooth/dataset --work_dir table3 --gpus 0 1 2 3 --seeds 3

The driver is the package module dreambooth_singlora.eval.table3 (installed with the wheel; `--help` lists
its flags, docs/EVAL.md describes it). Imported (experiments/lr_sweep.py does `import reproduce_table3`),
this file is that module itself: its stages, and a test's monkeypatch of them, are the package's.
"""

import sys

from dreambooth_singlora.eval import table3

if __name__ == "__main__":
    table3.main()
else:
    sys.modules[__name__] = table3
