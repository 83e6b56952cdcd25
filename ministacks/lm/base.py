"""The pretrained base on disk: how `pretrain` writes it and how every later stage loads it, checked.

A base is the ground of every stack trained on it (stacks are corrections to one set of weights), so
a base that silently changed under its stacks would make them meaningless. Its files therefore guard
themselves. Layout, in a run folder DIR:

    DIR/tokenizer.json              the tokenizer the base was pretrained with (tokenizer.py)
    DIR/base/model.safetensors      the weights (never pickle), written first
    DIR/base/config.json            written last, atomically:
        {ModelConfig fields ...,                     what `Transformer(ModelConfig(...))` needs
         "format": "ministacks-base",
         "tokenizer": fingerprint,                   the tokenizer above, by content
         "pretrain": PretrainConfig fields,          how the weights were made
         "sha256", "n_bytes": of model.safetensors,  so a damaged or swapped tensor file is caught
         "record_sha256": over all of the above}     so an edited record is caught too

`load_base` checks each in turn, and a failure is a RunFileError that names the damaged file and what
to do about it (`base_fix`), instead of a stack trace from torch or, worse, a different base that
loads without complaint. The record_sha256 is the same device a stack's record uses (stacks/store.py).
Bases written before these keys were recorded (a config.json of ModelConfig fields only) load
unchecked: `BASE_RECORD_KEYS` are all optional.

The pretraining config is recorded here, not only in the checkpoints, because checkpoints may be
deleted: `recorded_run_config` lets `pretrain.check_out_folder` tell, from the base alone, whether
pretraining into DIR again would rewrite this very base (same config: deterministic) or replace it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from safetensors.torch import save as safetensors_to_bytes

from ..io import (RunFileError, atomic_write_bytes, atomic_write_json, read_checked_tensors, read_json_file,
                  record_checksum)
from .model import ModelConfig, Transformer
from .tokenizer import Tokenizer

BASE_FORMAT = "ministacks-base"
# a folder whose base is a pretrained Hugging Face model instead (scale/model.py writes and reads it)
PRETRAINED_RECORD = "base/pretrained.json"
# what base/config.json records beside the ModelConfig's own fields (all optional: older bases lack them)
BASE_RECORD_KEYS = ("format", "tokenizer", "pretrain", "sha256", "n_bytes", "record_sha256")


def has_base(out: str | Path) -> bool:
    """Whether `out` holds a base: one pretrained from scratch here, or the record of a pretrained one."""
    out = Path(out)
    return (out / "base" / "model.safetensors").is_file() or is_pretrained(out)


def is_pretrained(out: str | Path) -> bool:
    """Whether `out`'s base is a pretrained Hugging Face model (OUT/base/pretrained.json, scale/model.py)."""
    return (Path(out) / PRETRAINED_RECORD).is_file()


def save_base(out: Path, model: Transformer, run_config: dict) -> None:
    """base/model.safetensors, then base/config.json: the ModelConfig plus the tensor file's sha256 and
    size, the tokenizer fingerprint and pretraining config, and record_sha256 over all of it.

    `run_config` is the form a checkpoint records: {"model": ModelConfig dict, "pretrain": ..., "tokenizer": ...}."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict_for_save().items()}
    # serialise once, in memory: the bytes hashed are exactly the bytes written
    data = safetensors_to_bytes(tensors)
    atomic_write_bytes(out / "base" / "model.safetensors", data)
    # the record goes last and names the tensor file's sha256: a kill between the two writes leaves a
    # pair that load_base refuses (no record, or one that does not match), never a base that loads wrong
    record = {**run_config["model"], "format": BASE_FORMAT, "tokenizer": run_config["tokenizer"],
              "pretrain": run_config["pretrain"], "sha256": hashlib.sha256(data).hexdigest(), "n_bytes": len(data)}
    record["record_sha256"] = record_checksum(record)
    atomic_write_json(out / "base" / "config.json", record)


def recorded_run_config(config_path: Path) -> dict | None:
    """The pretraining config base/config.json records (in a checkpoint's "config" form), or None when
    there is no record or it predates the "pretrain" and "tokenizer" keys."""
    if not config_path.is_file():
        return None
    record = read_json_file(config_path, "")
    if not isinstance(record, dict) or "pretrain" not in record or "tokenizer" not in record:
        return None
    model = {k: v for k, v in record.items() if k not in BASE_RECORD_KEYS}
    return {"model": model, "pretrain": record["pretrain"], "tokenizer": record["tokenizer"]}


def base_fix(run: Path) -> str:
    """What a user can do about a damaged base in `run`: the end of every RunFileError about it."""
    return (f"restore it, or run `python -m ministacks pretrain --out {run}` with the run's preset if "
            f"{run / 'checkpoints'} is still there (it rewrites the base from the last checkpoint); "
            "otherwise pretrain into a fresh folder (another --out)")


def load_base(run: str | Path) -> tuple[Transformer, Tokenizer]:
    """Load the pretrained base (frozen, eval mode) and its tokenizer from a run folder, checked:
    a damaged file, or a tokenizer that is not the base's, is a RunFileError naming the file."""
    run = Path(run)
    model_path, config_path, tok_path = run / "base" / "model.safetensors", run / "base" / "config.json", run / "tokenizer.json"
    if not model_path.is_file():
        raise FileNotFoundError(f"no pretrained base in {run}: run `python -m ministacks pretrain --out {run}` first")
    fix = base_fix(run)
    record = read_json_file(config_path, fix)
    if not isinstance(record, dict):
        raise RunFileError(config_path, f"damaged: not a ModelConfig record; {fix}")
    # the record first: its sha256 and n_bytes are what the tensor file is checked against below
    if "record_sha256" in record and record["record_sha256"] != record_checksum(record):
        raise RunFileError(config_path, f"edited or damaged: the record does not match its record_sha256; {fix}")
    try:
        model_cfg = ModelConfig.from_dict({k: v for k, v in record.items() if k not in BASE_RECORD_KEYS})
        model = Transformer(model_cfg)
    except (TypeError, ValueError) as e:
        raise RunFileError(config_path, f"damaged: cannot build the model it describes ({e}); {fix}") from None
    tensors = read_checked_tensors(model_path, record, fix)
    try:
        model.load_state_dict_from_save(tensors)
    except (RuntimeError, ValueError) as e:  # missing names or other shapes: not the model config.json describes
        raise RunFileError(model_path, f"does not fit {config_path} ({e}); {fix}") from None
    model.eval()
    tok = Tokenizer.load(tok_path)
    check_tokenizer(tok, tok_path, model_cfg, record, config_path)
    return model, tok


def check_tokenizer(tok: Tokenizer, tok_path: Path, model_cfg: ModelConfig, record: dict, config_path: Path) -> None:
    """The tokenizer must be the one the base was pretrained with: its fingerprint as recorded, and (for
    bases that predate the record) at least one embedding row per token id."""
    fix = "put back the tokenizer.json that `pretrain` wrote with this base, or pretrain into a fresh folder"
    # another tokenizer of the same size would load fine and map every id to the wrong embedding row
    if record.get("tokenizer") not in (None, tok.fingerprint()):
        raise RunFileError(tok_path, f"is tokenizer {tok.fingerprint()}, but the base was pretrained with tokenizer "
                                     f"{record['tokenizer']} (recorded in {config_path}); {fix}")
    if tok.vocab_size != model_cfg.vocab_size:
        raise RunFileError(tok_path, f"has {tok.vocab_size} tokens, but the base's embedding ({config_path}) has "
                                     f"{model_cfg.vocab_size} rows: not the tokenizer of this base; {fix}")
