"""`data`: build the five domain corpora and the general corpus (cached), and print their sizes."""

from __future__ import annotations

import json

from ..data import build_all
from ..presets import Preset, get_preset
from .common import add_preset_args

HELP = "build the domain corpora and print their sizes"


def stage_data(preset: Preset, progress: bool = True) -> dict:
    """Every corpus the preset's DataConfig asks for, built once and read from the cache after that.

    Returns the sizes per domain and split: what `data` prints and report.md's data section shows."""
    return build_all(preset.data, progress=progress)


def add_args(p) -> None:
    add_preset_args(p, None)


def main(args) -> int:
    print(json.dumps(stage_data(get_preset(args.preset), progress=not args.no_progress), indent=2))
    return 0
