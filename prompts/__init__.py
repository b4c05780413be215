"""Package data: the DreamBooth benchmark's subjects and prompts (read by dreambooth_singlora.prompts).

Installed as `dreambooth_singlora.benchmark_data` (pyproject.toml maps this folder there); the files
are read through importlib.resources, so they are found in a wheel install as in a checkout.
"""
