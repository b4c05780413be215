"""dreambooth-singlora: DreamBooth for Stable Diffusion 1.5 with SingLoRA adapters.

The public API is importable from here (`from dreambooth_singlora import add_adapter, ...`). It is
loaded on first use, so that importing the package (the command line's `--help`) does not import torch.
"""

import importlib

__version__ = "0.1.0"

_API = {  # name -> the module that defines it
    **dict.fromkeys(("add_adapter", "add_singlora", "adapter_state_dict", "get_config", "load_adapter",
                     "merge_adapter", "remove_adapter", "save_adapter", "set_step", "unmerge_adapter"), "adapter"),
    "SingLoRAConfig": "config", "UserError": "errors",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
