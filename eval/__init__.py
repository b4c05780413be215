"""Subject-fidelity evaluation (DreamBooth protocol): DINO, CLIP-I, CLIP-T and the real-image bound.

    from dreambooth_singlora.eval import load_encoders, score_folder, write_score_outputs, write_report
    encoders = load_encoders(["clip", "dino"], checkpoints={"clip": ..., "dino": ...})
    result = score_folder("out/images", "dataset", encoders)
    write_score_outputs(result, "out/eval", name="singlora")

Installed, this folder is the package `dreambooth_singlora.eval` (pyproject.toml's package-dir): import
it by that name. From a checkout, `python -m eval ...` runs the same code under the folder's name; the
modules import each other relatively, so either name works. The protocol, in this project's words
with its sources, is docs/PROTOCOL.md; docs/EVAL.md says how to run it.
"""

from dreambooth_singlora import lazy_api

_API = {  # name -> the module that defines it; loaded on first use, so that `eval --help` imports no torch
    **dict.fromkeys(("Encoder", "available_encoders", "image_encoder", "load_encoder", "load_encoders",
                     "register_encoder"), "encoders"),
    **dict.fromkeys(("load_results", "write_bound", "write_report", "write_score_outputs"), "report"),
    **dict.fromkeys(("ReferenceCache", "real_image_bound", "scan_images", "score_folder"), "score"),
}
__all__ = sorted(_API)
__getattr__ = lazy_api(__name__, _API)
