"""dreambooth-singlora: DreamBooth for Stable Diffusion (1.x, 2.x, XL) with SingLoRA adapters.

The public API is importable from here (`from dreambooth_singlora import add_adapter, ...`). It is
loaded on first use, so that importing the package (the command line's `--help`) does not import torch.
"""

import importlib
import os

__version__ = "0.1.0"

# Installed (pip install ., -e ., or the wheel), the repository's eval/ folder is this package's `eval`
# subpackage (pyproject.toml's package-dir). Imported straight from a checkout that is not installed (the
# checkout on PYTHONPATH, or as the current folder shadowing an install), the same mapping is made here: the
# repository root joins this package's search path, so `dreambooth_singlora.eval` is eval/ there too.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_checkout, "eval", "__init__.py")) and \
        os.path.isfile(os.path.join(_checkout, "pyproject.toml")):
    __path__.append(_checkout)  # noqa: F821 - the package's own __path__

_API = {  # name -> the module that defines it
    **dict.fromkeys(("add_adapter", "add_singlora", "adapter_state", "adapter_state_dict", "get_config",
                     "load_adapter", "merge_adapter", "remove_adapter", "save_adapter", "set_step", "set_strength",
                     "unmerge_adapter"), "adapter"),
    **dict.fromkeys(("Base", "detect_family"), "base"),
    "SingLoRAConfig": "config", "UserError": "errors",
}
__all__ = sorted(_API)


def lazy_api(package: str, api: dict):
    """A package's module-level __getattr__ that imports each name of `api` ({name: module}) on first use."""
    def __getattr__(name):
        if name in api:
            return getattr(importlib.import_module(f".{api[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__


__getattr__ = lazy_api(__name__, _API)
