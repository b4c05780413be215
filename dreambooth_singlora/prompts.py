"""The DreamBooth benchmark's subjects and prompts, read from the data files in prompts/.

prompts/subjects.csv   subject,class,kind (kind: object | live), the 30 DreamBooth subjects
prompts/object.txt     25 evaluation prompts for objects, "{}" where "sks <class>" goes
prompts/live.txt       25 evaluation prompts for live subjects (dogs and cats)

The folder installs as the package data `dreambooth_singlora.benchmark_data` (pyproject.toml's package-dir) and is
read through importlib.resources, so a wheel install finds it as a checkout does (prompts_dir says the search order).
"""

from __future__ import annotations

import csv
import importlib.resources
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import UserError

IDENTIFIER = "sks"
DATA_PACKAGE = "dreambooth_singlora.benchmark_data"  # the prompts/ folder, as installed (pyproject.toml)


def prompts_dir() -> Path:
    """The folder of subjects.csv, object.txt and live.txt: $DREAMBOOTH_SINGLORA_PROMPTS if set, else the installed
    package data, else prompts/ beside the package (a checkout that was never installed)."""
    if os.environ.get("DREAMBOOTH_SINGLORA_PROMPTS"):
        return Path(os.environ["DREAMBOOTH_SINGLORA_PROMPTS"])
    try:
        return Path(str(importlib.resources.files(DATA_PACKAGE)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "prompts"


@dataclass(frozen=True)
class Subject:
    name: str
    class_name: str
    live: bool

    @property
    def kind(self) -> str:
        return "live" if self.live else "object"

    def instance_prompt(self, identifier: str = IDENTIFIER) -> str:
        return f"a photo of {identifier} {self.class_name}"

    def class_prompt(self) -> str:
        return f"a photo of {self.class_name}"

    def eval_prompts(self, identifier: str = IDENTIFIER) -> list[str]:
        """The 25 DreamBooth evaluation prompts for this subject, "sks <class>" filled in."""
        return [t.format(f"{identifier} {self.class_name}") for t in prompt_templates(self.kind)]


@lru_cache(maxsize=None)
def _read_subjects(folder: str) -> dict[str, Subject]:
    with open(Path(folder) / "subjects.csv", newline="", encoding="utf-8") as f:
        return {r["subject"]: Subject(r["subject"], r["class"], r["kind"] == "live") for r in csv.DictReader(f)}


def subjects() -> dict[str, Subject]:
    """All 30 subjects, by name, in the table's order."""
    return _read_subjects(str(prompts_dir()))


def resolve_subjects(names=None) -> list[str]:
    """The subjects a command's --subjects means: all 30 (in the table's order) for none or ['all'], else the
    names given, each checked (one clear error for an unknown name)."""
    if not names or list(names) == ["all"]:
        return list(subjects())
    names = list(names)
    if "all" in names:
        raise UserError("--subjects takes 'all' alone, or a list of subject names")
    for n in names:
        get_subject(n)
    return names


def get_subject(name: str) -> Subject:
    table = subjects()
    if name not in table:
        raise UserError(f"unknown subject {name!r}; valid: {', '.join(table)}")
    return table[name]


@lru_cache(maxsize=None)
def _read_templates(path: str) -> tuple[str, ...]:
    return tuple(line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())


def prompt_templates(kind: str) -> list[str]:
    """The 25 templates ("a {} in the jungle") for kind 'object' or 'live'."""
    if kind not in ("object", "live"):
        raise UserError(f"unknown prompt kind {kind!r}; valid: object, live")
    return list(_read_templates(str(prompts_dir() / f"{kind}.txt")))


def strip_identifier(prompt: str, identifier: str = IDENTIFIER) -> str:
    """'a sks backpack in the jungle' -> 'a backpack in the jungle' (the CLIP-T text by default)."""
    return " ".join(w for w in prompt.split() if w != identifier)


def slugify(text: str, max_len: int = 80) -> str:
    """A file-name-safe slug: lowercase ASCII letters, digits and '-', never a path."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return slug or "prompt"
