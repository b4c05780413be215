"""What a finished run leaves for people and for other tools: the loss plot and the model card.

The plot is drawn with matplotlib's object API (`Figure`), never pyplot's global backend: a notebook that trains
from the Python API keeps its inline plots. The model card (README.md beside the adapter) carries the Hub's
metadata header (base_model, tags, instance prompt as widget text, licence), written through huggingface_hub's
ModelCard, so that the Hub's filters and other tools read it.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from . import __version__
from .fileio import atomic_path

#: the licence of each family's original weights (a fine-tune's own card, where it names one, wins)
LICENCES = {"sd1": "creativeml-openrail-m", "sd2": "openrail++", "sdxl": "openrail++"}


def plot_loss(history: list, path: Path, name: str = "") -> None:
    """A PNG of the loss curve, [[step, loss], ...]."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    if history:
        ax.plot([h[0] for h in history], [h[1] for h in history])
    ax.set(xlabel="optimizer step", ylabel="loss (mean over log window)",
           title=f"training loss: {name}" if name else "training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def base_licence(src: str, family: str) -> str | None:
    """The licence of the base model: its own card's (a local folder's README.md), else the family's original."""
    from huggingface_hub import ModelCard

    card = Path(src).expanduser() / "README.md"
    if card.is_file():
        try:
            licence = ModelCard.load(card).data.license
        except Exception:  # noqa: BLE001 - a card without (valid) metadata
            licence = None
        if licence:
            return licence
    return LICENCES.get(family)


def model_card(cfg, family, member, step: int, n_params: int, seconds: float) -> str:
    """The adapter folder's README.md: the Hub's metadata header, then the package's model_card.md template."""
    from huggingface_hub import ModelCard, ModelCardData

    template = importlib.resources.files(__package__).joinpath("model_card.md").read_text(encoding="utf-8")
    body = template.format_map({
        **cfg.to_dict(), "prompt": member.instance_prompt, "class_prompt": member.class_prompt or "-", "step": step,
        "base_model": cfg.pretrained_model_name_or_path, "version": __version__, "n_params": n_params,
        "targets": ", ".join(cfg.target_modules), "seconds": seconds, "out": member.output_dir,
        "out_name": member.output_dir.name, "family_label": family.label})
    data = ModelCardData(
        base_model=cfg.pretrained_model_name_or_path, license=base_licence(cfg.pretrained_model_name_or_path,
                                                                           family.name),
        library_name="diffusers", pipeline_tag="text-to-image",
        tags=["text-to-image", "diffusers", "lora", "dreambooth", "singlora" if cfg.method == "singlora" else cfg.method,
              "dreambooth-singlora", {"sd1": "stable-diffusion", "sd2": "stable-diffusion",
                                      "sdxl": "stable-diffusion-xl"}[family.name]],
        instance_prompt=member.instance_prompt, widget=[{"text": member.instance_prompt}])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
