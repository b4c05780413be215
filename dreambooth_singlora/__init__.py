"""dreambooth-singlora: DreamBooth for Stable Diffusion 1.5 with SingLoRA adapters."""

__version__ = "0.1.0"

from .adapter import (  # noqa: E402
    add_adapter,
    add_singlora,
    adapter_state_dict,
    get_config,
    load_adapter,
    merge_adapter,
    remove_adapter,
    save_adapter,
    set_step,
    unmerge_adapter,
)
from .config import SingLoRAConfig  # noqa: E402
from .errors import UserError  # noqa: E402

__all__ = [
    "SingLoRAConfig", "UserError", "add_adapter", "add_singlora", "adapter_state_dict", "get_config",
    "load_adapter", "merge_adapter", "remove_adapter", "save_adapter", "set_step", "unmerge_adapter",
]
