"""Multi-task training from the frozen LLM's labels (docs/method.md).

``train(config)`` fine-tunes an :class:`~llm_embedder.Embedder` on labelled files of one or
more tasks: each step takes a homogeneous batch (one task, length-bucketed), builds for every
query a group of candidates (its best-rewarded candidate plus negatives), embeds queries and
keys with their task instructions, and applies the task's loss (graded distillation, KL
distillation or contrastive, from the loss registry). The learning rate of a step is
``lr · schedule(step) · clip(L̄_t / L⁰_t, s_min, 1)`` for the batch's task t (self-paced).
:class:`Trainer` holds the state of a run; ``train(config)`` is ``Trainer(config).run()``.

It runs unchanged under ``torchrun --nproc_per_node N`` (gloo on CPU, nccl on GPUs): every
rank takes its share of the same task's batch, keys of all ranks serve as negatives, and rank 0
writes the checkpoints, the log and the model. Checkpoints are written atomically and hold
only tensors and plain values (loaded with ``weights_only=True``); a killed run continues with
``resume=True`` and ends with the weights an uninterrupted run would have.

Outputs in ``output_dir``: ``model/`` (the final :class:`Embedder` folder), ``checkpoint/``
(model + optimizer, schedule, sampler position, self-pace state, RNG states),
``log.jsonl`` (one line a step), ``training.png`` (with matplotlib) and ``train_config.json``.
A non-empty ``output_dir`` that is not a training run is refused unless ``overwrite: true``.

Example:
    >>> from llm_embedder import train
    >>> model_dir = train({"tasks": {"qa": "labels/qa.jsonl", "chat": "labels/chat.jsonl"},
    ...                    "output_dir": "runs/demo", "max_steps": 200, "batch_size": 32})
    >>> Embedder.from_pretrained(model_dir)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import Config, ConfigError
from .config import check as check_key
from .data import DataError, LabelledQuery, load_labelled
from .io import (
    FolderNotOursError,
    JsonlAppender,
    atomic_directory,
    atomic_file,
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    clean_stale_temporaries,
)
from .label import REWARDS, Reward, get_reward
from .losses import LOSSES, build_loss
from .memory import return_free_heap
from .sampler import HomogeneousBatchSampler, SelfPacedScheduler
from .tasks import get_task

logger = logging.getLogger(__name__)

__all__ = [
    "TaskSpec",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "load_config",
    "main_train",
    "plot_training",
    "train",
]

PathLike = Union[str, "os.PathLike[str]"]

# lr when none is given: the reference's 5e-6 suits BERT-base-sized encoders; the packaged
# MiniLM (22M parameters) learns far too slowly with it.
DEFAULT_LR_PACKAGED = 5e-5
DEFAULT_LR = 5e-6

#: ``TrainConfig.mixed_precision`` values -> the autocast dtype (None: float32).
#: ``micro_batch_size="auto"`` on a CPU: padded tokens per forward pass. At length 256 that is 2
#: texts: a MiniLM step (batch 8, group 8) in 1.74 GB resident (8.7 GB for the whole batch in one
#: pass), and the quickstart's train stage 220 MB below 1024 tokens a pass, for ~4 % more time.
AUTO_TOKENS_PER_PASS = 512

MIXED_PRECISION: Dict[str, Optional[torch.dtype]] = {"no": None, "bf16": torch.bfloat16,
                                                     "fp16": torch.float16}


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, a checkpoint that does not fit the config, ...)."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TaskSpec(Config):
    """One task's training data: the labelled file, and optionally its own loss, reward and
    teacher temperature (each defaults to the :class:`TrainConfig`'s or the task's).

    Example:
        >>> TaskSpec(file="labels/chat.jsonl", loss="kl", teacher_temperature=0.05)
    """

    file: str
    loss: Optional[str] = None  # a name in losses.LOSSES; default: the task's own
    reward: Optional[str] = None  # a name in label.REWARDS; default: TrainConfig.reward
    # a float, "auto" (from the rewards' within-query spread), default TrainConfig's
    teacher_temperature: Union[float, Literal["auto"], None] = None


# Old key -> its name now. reward_temperature (graded) and kl_temperature (KL) were two names
# of one quantity with the same default; a task that needs its own value now sets it per task.
_DEPRECATED_KEYS = {"temperature": "score_temperature",
                    "reward_temperature": "teacher_temperature",
                    "kl_temperature": "teacher_temperature"}


@dataclass
class TrainConfig(Config):
    """Everything ``train`` needs; built and validated like every config (see
    :class:`~llm_embedder.config.Config`): a wrong type or value is a ConfigError naming the key.

    ``tasks`` maps a registered task name to its labelled file (the labeller's output), or to
    ``{"file": path, "loss": ..., "reward": ..., "teacher_temperature": ...}`` (see
    :class:`TaskSpec`). Relative paths are relative to the current directory. Loss names come
    from ``llm_embedder.losses.LOSSES``, reward names from ``llm_embedder.label.REWARDS``.

    Temperatures — one scheme for the whole package:

    - ``score_temperature`` (tau, default 0.01): the student's scores ``s = cos(q, k) / tau``
      in every loss;
    - ``teacher_temperature`` (T, default 0.1): the teacher distribution ``softmax(r / T)``
      over a query's candidate rewards — the weights of graded distillation and the target of
      KL distillation. A task may set its own (``tasks.<name>.teacher_temperature``).
      ``"auto"``: T of each query is ``teacher_spread`` (default 0.5) times the standard
      deviation of its rewards, so a reward's own scale (rank-aware rewards step by 1/(N+1),
      likelihoods by fractions of a nat) does not set the sharpness, and a query whose
      rewards are all equal is skipped (nothing to learn from it);
    - ``task_temperature`` (default 1): task sampling; 1 draws tasks in proportion to their
      size, larger is more uniform;
    - ``task_min_share`` (task name -> share in [0, 1), default none): the least share of
      steps a (small) task gets: it is repeated whole within an epoch as often as it takes
      (``HomogeneousBatchSampler.task_repeats``; each copy batched on its own);
    - (the labeller's ``sampling_temperature`` in ``LabelConfig`` is the LLM's, not ours).

    ``interpolate_with_start`` (alpha in (0, 1], default 1): the saved model's weights are
    ``alpha * trained + (1 - alpha) * start`` (WiSE-FT weight-space ensembling; start = the
    model training began from, ``model``). Below 1 it gives back part of what fine-tuning on
    small task data costs out of domain; 1 saves the trained weights as they are. Checkpoints
    always hold the trained weights, so a resumed run interpolates once, at the end.

    Human positives beside the LLM's reward (``human_positives``; a labelled record keeps the
    query's annotated ``positive_ids``; a query without any, every icl query, is unchanged):

    - ``"reward"`` (default): the reward alone orders the candidates, as the method has it;
    - ``"anchor"``: a human positive ranks first: its reward is raised to the query's best
      reward plus one within-query standard deviation (1 when the rewards are all equal), and
      the LLM's reward grades the other candidates;
    - ``"agree"``: only queries whose best-rewarded candidate is a human positive are kept
      (the LLM's reward and the annotation agree), with their rewards as they are.

    The old keys ``temperature`` (now ``score_temperature``) and ``reward_temperature`` /
    ``kl_temperature`` (now ``teacher_temperature``) are still read, with a DeprecationWarning.

    Speed and memory:

    - ``micro_batch_size`` (texts per forward pass; ``"auto"``, the default: on a CPU as many
      as fit in ``AUTO_TOKENS_PER_PASS`` = 512 padded tokens at the side's max length — 2 keys
      of 256 tokens, 8 queries of 64 —, on a GPU the whole batch; ``None``: every query,
      then every key of the step, in one pass; an int: that many): embeds the step's queries
      and keys in chunks of this many texts, GradCache-style — all chunks without gradients
      first (longest texts together, each chunk padded to its own longest, which also saves
      the padding a whole-batch pass pays),
      then the loss over the *whole* batch and its gradient with respect to the embeddings,
      then each chunk again with gradients, replaying the chunk's dropout, backpropagating the
      cached gradient. In-batch negatives and the gradient are those of the full batch (equal
      up to float rounding when dropout is off); memory is that of one chunk; it costs one
      extra forward pass without gradients. At batch 8, group 8, length 256 on the packaged
      MiniLM the peak resident memory is 1.9 GB with 4, 2.4 GB with 8, 8.7 GB without. With
      dropout on, chunks draw other dropout masks than one whole-batch pass would, so a run
      with ``micro_batch_size: null`` gives other (equally valid) numbers than the default.
    - ``gradient_checkpointing``: keep only each layer's input and recompute the layer in the
      backward pass (about a third more compute, far less activation memory); the same
      weights as without it.
    - ``mixed_precision``: ``"no"`` (float32), ``"bf16"`` or ``"fp16"`` autocast of the encoder
      (the losses always score in float32). fp16 needs a CUDA GPU (with loss scaling); bf16 a
      GPU that supports it, or a CPU (slow on CPUs without native bf16, warned). Anything else
      is a ConfigError naming ``mixed_precision``. The older ``bf16: true`` / ``fp16: true``
      still work as before: autocast on a GPU, ignored with a warning elsewhere.

    Example:
        >>> config = TrainConfig.load({"tasks": {"tool": "labels/tool.jsonl"}, "max_steps": 40})
        >>> config.learning_rate
        5e-05
    """

    tasks: Dict[str, Any] = field(default_factory=dict)
    output_dir: str = "runs/llm-embedder"
    model: Optional[str] = None  # Embedder folder or hub id; None: the packaged MiniLM
    max_steps: Optional[int] = None  # wins over epochs when both are set
    epochs: Optional[float] = None  # default 1 epoch when max_steps is None
    batch_size: int = 32  # queries per step per process
    group_size: int = 8  # candidates per query: 1 positive (top reward) + group_size-1 others
    query_max_length: int = 256
    key_max_length: int = 256
    lr: Optional[float] = None  # None: 5e-5 for the packaged MiniLM, else 5e-6 (reference)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 disables clipping
    loss: Optional[str] = None  # one loss for every task (ablations); None: per task
    reward: str = "rank"  # "rank" (rank-aware) | "likelihood" (the reference's reward) | ...
    human_positives: str = "reward"  # | "anchor" | "agree": see the docstring
    batching: str = "homogeneous"  # | "mixed" (ablation: all tasks pooled in each batch)
    self_paced: bool = True  # False: fixed lr for every task (ablation)
    s_min: float = 0.1  # lowest self-paced lr factor
    ema: float = 0.9  # decay of the per-task loss EMA
    pace_init_batches: int = 3  # batches of a task that define its initial loss L⁰
    score_temperature: float = 0.01  # tau (see the docstring)
    teacher_temperature: Union[float, Literal["auto"]] = 0.1  # T (see the docstring)
    teacher_spread: float = 0.5  # with teacher_temperature "auto" (see the docstring)
    task_temperature: float = 1.0  # task sampling (see the docstring)
    task_min_share: Dict[str, float] = field(default_factory=dict)  # (see the docstring)
    cross_device_negatives: bool = True
    seed: int = 0
    save_steps: int = 500  # checkpoint every this many steps (0: only at the end)
    resume: bool = False  # continue from output_dir/checkpoint when there is one
    overwrite: bool = False  # start afresh over a checkpoint; write into a foreign folder
    # texts per forward pass, GradCache: "auto" (CPU: AUTO_TOKENS_PER_PASS), null, or an int
    micro_batch_size: Union[int, Literal["auto"], None] = "auto"
    gradient_checkpointing: bool = False  # recompute activations in backward (docstring)
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" autocast (docstring)
    bf16: bool = False  # older switch: bf16 on a GPU, ignored elsewhere (mixed_precision errs)
    fp16: bool = False  # older switch: fp16 on a GPU, ignored elsewhere
    device: Optional[str] = None  # default: cuda (this process's GPU) when available, else cpu
    log_every: int = 10  # console log line every this many steps (log.jsonl gets every step)
    progress_bar: bool = True
    plot: bool = True  # write training.png at the end (needs matplotlib)
    interpolate_with_start: float = 1.0  # alpha: saved = alpha*trained + (1-alpha)*start

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a plain dict (e.g. parsed YAML); unknown keys and wrong types are
        ConfigErrors naming the key; deprecated temperature keys are renamed with a warning.

        Example:
            >>> TrainConfig.from_dict({"tasks": {"tool": "tool.jsonl"}, "batch_size": 16})
        """
        if not isinstance(values, Mapping):
            return super().from_dict(values)  # the base class names the wrong type
        return super().from_dict(_renamed_keys(values))

    def to_dict(self) -> Dict[str, Any]:
        """Plain values (``tasks`` normalised to full task specs), as written to
        ``train_config.json``."""
        out = dataclasses.asdict(self)
        out["tasks"] = {name: spec.to_dict() for name, spec in self.task_specs().items()}
        return out

    def task_specs(self) -> Dict[str, TaskSpec]:
        """``tasks`` normalised to :class:`TaskSpec` (validated; ConfigError naming the key).

        Example:
            >>> TrainConfig(tasks={"tool": "tool.jsonl"}).task_specs()["tool"].file
            'tool.jsonl'
        """
        check_key(isinstance(self.tasks, Mapping) and bool(self.tasks), "tasks",
                  "must map at least one task name to a labelled file")
        return {name: _task_spec(name, value) for name, value in self.tasks.items()}

    def check(self) -> None:
        """Value checks (the types are checked by the base class)."""
        self.task_specs()
        for key in ("batch_size", "group_size", "pace_init_batches", "log_every"):
            check_key(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("query_max_length", "key_max_length"):
            check_key(getattr(self, key) >= 2, key, "must be >= 2")
        for key in ("weight_decay", "max_grad_norm", "save_steps", "seed"):
            check_key(getattr(self, key) >= 0, key, "must be >= 0")
        for key in ("score_temperature", "task_temperature", "teacher_spread"):
            check_key(getattr(self, key) > 0, key, "must be > 0")
        for task, share in self.task_min_share.items():
            check_key(task in self.tasks, f"task_min_share.{task}",
                      f"is not one of the trained tasks {sorted(self.tasks)}")
            check_key(isinstance(share, (int, float)) and 0 <= share < 1,
                      f"task_min_share.{task}", f"must be a share in [0, 1), got {share!r}")
        check_key(self.teacher_temperature == "auto" or self.teacher_temperature > 0,
                  "teacher_temperature", "must be > 0 or \"auto\"")
        check_key(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        check_key(self.epochs is None or self.epochs > 0, "epochs", "must be > 0")
        check_key(self.lr is None or self.lr > 0, "lr", "must be > 0")
        check_key(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        check_key(0 < self.s_min <= 1, "s_min", "must be in (0, 1]")
        check_key(0 <= self.ema < 1, "ema", "must be in [0, 1)")
        check_key(0 < self.interpolate_with_start <= 1, "interpolate_with_start",
                  "must be in (0, 1] (1: save the trained weights as they are)")
        check_key(self.loss is None or self.loss in LOSSES, "loss",
                  f"loss must be one of {sorted(LOSSES)} or null, got {self.loss!r}")
        check_key(self.reward in REWARDS, "reward",
                  f"reward must be one of {sorted(REWARDS)}, got {self.reward!r}")
        check_key(self.human_positives in HUMAN_POSITIVES, "human_positives",
                  f"must be one of {list(HUMAN_POSITIVES)}, got {self.human_positives!r}")
        check_key(self.batching in ("homogeneous", "mixed"), "batching",
                  f"must be 'homogeneous' or 'mixed', got {self.batching!r}")
        check_key(not (self.bf16 and self.fp16), "fp16", "choose at most one of bf16 and fp16")
        check_key(self.mixed_precision in MIXED_PRECISION, "mixed_precision",
                  f"must be one of {list(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        check_key(self.mixed_precision == "no" or not (self.bf16 or self.fp16), "mixed_precision",
                  "give either mixed_precision or the older bf16/fp16 switch, not both")
        check_key(self.micro_batch_size in (None, "auto") or self.micro_batch_size >= 1,
                  "micro_batch_size", "must be >= 1, \"auto\" or null (the whole batch in one "
                                      "pass)")
        output_dir = Path(self.output_dir)
        check_key(output_dir.is_dir() or not output_dir.exists(), "output_dir",
                  f"{output_dir} exists and is not a folder: choose another output_dir")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the default for the model (5e-5 for the packaged MiniLM, else 5e-6)."""
        if self.lr is not None:
            return float(self.lr)
        return DEFAULT_LR_PACKAGED if self.model is None else DEFAULT_LR


def _renamed_keys(values: Mapping[str, Any]) -> Dict[str, Any]:
    """``values`` with the deprecated temperature keys under their names of now."""
    out = dict(values)
    old = {key: out.pop(key) for key in _DEPRECATED_KEYS if key in out}
    teacher = [old[k] for k in ("reward_temperature", "kl_temperature") if k in old]
    if len(set(teacher)) > 1:
        raise ConfigError(
            f"config keys 'reward_temperature' ({teacher[0]}) and 'kl_temperature' "
            f"({teacher[1]}) differ; both are now 'teacher_temperature': give one value, and "
            f"set tasks.<name>.teacher_temperature for a task that needs another")
    for key, value in old.items():
        new = _DEPRECATED_KEYS[key]
        warnings.warn(f"config key {key!r} is deprecated: use {new!r}", DeprecationWarning,
                      stacklevel=4)
        if new in out and out[new] != value:
            raise ConfigError(f"config keys {key!r} (deprecated) and {new!r} both given, with "
                              f"different values: keep only {new!r}")
        out[new] = value
    return out


def _task_spec(name: str, value: Any) -> TaskSpec:
    """One ``tasks`` entry as a validated :class:`TaskSpec`; ConfigError naming the key."""
    key = f"tasks.{name}"
    try:
        get_task(name)
    except ValueError as exc:
        raise ConfigError(f"config key {key!r}: {exc}") from None
    if isinstance(value, (str, os.PathLike)):
        return TaskSpec(file=os.fspath(value))
    if isinstance(value, TaskSpec):
        value = value.to_dict_shallow()
    if not isinstance(value, Mapping):
        raise ConfigError(f"config key {key!r}: must be a path or a mapping {{file, loss?, "
                          f"reward?, teacher_temperature?}}, got {type(value).__name__}")
    check_key("file" in value, f"{key}.file", "missing: give the task's labelled file")
    try:
        spec = TaskSpec.from_dict(value)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    check_key(spec.loss is None or spec.loss in LOSSES, f"{key}.loss",
              f"loss must be one of {sorted(LOSSES)}, got {spec.loss!r}")
    check_key(spec.reward is None or spec.reward in REWARDS, f"{key}.reward",
              f"reward must be one of {sorted(REWARDS)}, got {spec.reward!r}")
    check_key(spec.teacher_temperature in (None, "auto") or spec.teacher_temperature > 0,
              f"{key}.teacher_temperature", "must be > 0 or \"auto\"")
    return dataclasses.replace(spec, file=os.fspath(spec.file))


def load_config(source: Union[TrainConfig, Mapping[str, Any], PathLike]) -> TrainConfig:
    """A validated :class:`TrainConfig` from itself (copied), a dict, or a YAML/JSON file.

    Example:
        >>> config = load_config("train.yaml")
    """
    return TrainConfig.load(source)


# --------------------------------------------------------------------------------------------
# Data: labelled queries -> examples -> per-step groups
# --------------------------------------------------------------------------------------------


@dataclass
class _Example:
    task: int
    query: str
    texts: List[str]
    rewards: np.ndarray  # float32, aligned with texts
    key_ids: np.ndarray  # int64 hash of each text: equal texts are the same key
    order: np.ndarray  # candidate indices by reward, descending (stable)


def _text_id(text: str) -> int:
    # A process-independent hash (Python's hash() is salted per process, and ranks must agree).
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(),
                          "little", signed=True)


_RECORD_FIELDS = frozenset(f.name for f in dataclasses.fields(LabelledQuery))


def _reward_values(record: LabelledQuery, reward: Reward, path: Path) -> List[float]:
    """The values of ``reward`` for each candidate of ``record`` (a record attribute, or a
    field the labeller kept in ``extra``)."""
    if reward.field in _RECORD_FIELDS:
        values = getattr(record, reward.field)
    elif reward.field in record.extra:
        values = record.extra[reward.field]
    else:
        raise DataError(path, None, f"query {record.query_id!r} has no field {reward.field!r} "
                                    f"(reward {reward.name!r}): label the file with that "
                                    f"reward, or train with another")
    if not isinstance(values, list) or len(values) != len(record.candidates):
        raise DataError(path, None, f"query {record.query_id!r}: field {reward.field!r} must "
                                    f"hold one number per candidate ({len(record.candidates)})")
    return values


def _example(task_index: int, record: LabelledQuery, values: Sequence[float],
             path: Path) -> _Example:
    texts, rewards = [], []
    for cand, value in zip(record.candidates, values):
        if cand["id"] == "":  # the empty context: a reward baseline, not a key
            continue
        if not cand["text"].strip():
            raise DataError(path, None, f"query {record.query_id!r}: candidate "
                                        f"{cand['id']!r} has an empty text")
        texts.append(cand["text"])
        rewards.append(value)
    if not texts:
        raise DataError(path, None, f"query {record.query_id!r} has no candidate "
                                    f"besides the empty context: nothing to train on")
    if not record.query.strip():
        raise DataError(path, None, f"query {record.query_id!r} has an empty text")
    reward_array = np.asarray(rewards, dtype=np.float32)
    return _Example(task=task_index, query=record.query, texts=texts, rewards=reward_array,
                    key_ids=np.asarray([_text_id(t) for t in texts], dtype=np.int64),
                    order=np.argsort(-reward_array, kind="stable"))


#: ``TrainConfig.human_positives``: how a record's annotated positives enter its rewards.
HUMAN_POSITIVES = ("reward", "anchor", "agree")


def _with_human_positives(record: LabelledQuery, values: Sequence[float], policy: str
                          ) -> Optional[List[float]]:
    """``values`` (one reward per candidate of ``record``) under ``policy`` (see
    :data:`HUMAN_POSITIVES`); None when ``"agree"`` drops the query."""
    positives = set(record.positive_ids)
    is_positive = [c["id"] in positives for c in record.candidates]
    if policy == "reward" or not any(is_positive):
        return list(values)
    keys = [(v, p) for v, p, c in zip(values, is_positive, record.candidates) if c["id"] != ""]
    if policy == "agree":
        best = max(v for v, _ in keys)
        return list(values) if any(p and v == best for v, p in keys) else None
    rewards = np.asarray([v for v, _ in keys], dtype=np.float64)
    # One spread above the best: the positive leads the teacher by the query's own scale
    # (rank-aware rewards step by 1/(N+1), likelihoods by fractions of a nat).
    lead = float(rewards.max()) + (float(rewards.std()) or 1.0)
    return [lead if p else float(v) for v, p in zip(values, is_positive)]


def _load_examples(specs: Mapping[str, TaskSpec], reward_default: str,
                   human_positives: str = "reward") -> Tuple[List[_Example], List[str]]:
    """Every task's training examples; ``human_positives`` as :class:`TrainConfig`'s. A task
    left with no example (``"agree"`` dropped them all) is a DataError naming its file."""
    examples: List[_Example] = []
    for task_index, (name, spec) in enumerate(specs.items()):
        path = Path(spec.file)
        if not path.is_file():
            raise FileNotFoundError(f"labelled file for task {name!r} not found: {path} "
                                    f"(resolved: {path.resolve()}); run `llm-embedder label` "
                                    f"first")
        reward = get_reward(spec.reward or reward_default)
        kept = 0
        for record in load_labelled(path):
            if record.task != name:
                raise DataError(path, None, f"query {record.query_id!r} is labelled for task "
                                            f"{record.task!r}, but the file is configured for "
                                            f"task {name!r}")
            values = _with_human_positives(record, _reward_values(record, reward, path),
                                           human_positives)
            if values is not None:
                examples.append(_example(task_index, record, values, path))
                kept += 1
        if not kept:
            raise DataError(path, None, f"task {name!r} has no training query left (file "
                                        f"empty, or human_positives={human_positives!r} "
                                        f"dropped every query)")
    return examples, list(specs)


def _make_sampler(config: TrainConfig, examples: Sequence[_Example], rank: int = 0,
                  world: int = 1) -> HomogeneousBatchSampler:
    """The run's batches of example indices (benches/bench_train.py feeds the same batches to
    its peer)."""
    names = list(config.task_specs())  # task ids follow this order (_load_examples)
    return HomogeneousBatchSampler(
        [e.task for e in examples],
        [len(e.query) + sum(len(t) for t in e.texts) // len(e.texts) for e in examples],
        config.batch_size, config.seed, mixed=config.batching == "mixed",
        task_temperature=config.task_temperature,
        min_share={names.index(t): share for t, share in config.task_min_share.items()},
        rank=rank, world_size=world)


def _group(example: _Example, group_size: int, seed: int, epoch: int, index: int) -> np.ndarray:
    """Candidate indices for one step: the best-rewarded one, then up to group_size-1 others,
    sampled from the rest when there are more (fixed by seed, epoch and example; in rank
    order)."""
    order = example.order
    if len(order) <= group_size:
        return order
    rng = np.random.default_rng([seed, epoch, index])
    rest = np.sort(rng.choice(np.arange(1, len(order)), size=group_size - 1, replace=False))
    return np.concatenate([order[:1], order[rest]])


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------


def _setup_distributed(config: TrainConfig) -> Tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, whether we initialised the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if world > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (config.device is None
                                                 or str(config.device).startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if config.device is not None:
        device = torch.device(config.device)
        if device.type == "cuda" and device.index is None and world > 1:
            device = torch.device("cuda", local_rank)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return rank, world, device, created


def _all_reduce_sum(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _gather_objects(obj: Any, world: int) -> List[Any]:
    if world == 1:
        return [obj]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


class _DualEncoder(nn.Module):
    """Queries and keys in one forward call, so DDP sees one forward per backward (any number
    of tokenised batches in, one embedding tensor per batch out)."""

    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.embedder = embedder

    def forward(self, *batches: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        return tuple(self.embedder.embed(batch) for batch in batches)


# --------------------------------------------------------------------------------------------
# Output folder and checkpoints
# --------------------------------------------------------------------------------------------

# A temporary of io's naming (.<name>.<pid>.<hex>.tmp|.old...): a killed writer's leftovers.
_TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]+\.(tmp|old)")


def _is_training_run(folder: Path) -> bool:
    """Whether ``folder`` is one of our training runs (so training may write into it): it holds
    our config, log, checkpoint or model, or only temporaries a killed run left."""
    return ((folder / "train_config.json").is_file() or (folder / "log.jsonl").is_file()
            or (folder / "checkpoint" / "state.pt").is_file()
            or (folder / "model" / "config.json").is_file()
            or all(_TEMPORARY.match(entry.name) for entry in folder.iterdir()))


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    try:
        check_replaceable(output_dir, _is_training_run, "training run", overwrite)
    except FolderNotOursError:
        raise FolderNotOursError(
            f"output_dir {output_dir} is a non-empty folder that is not a training run: "
            f"refusing to write into it (choose another output_dir, or set overwrite: true to "
            f"write there anyway)") from None


def _rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors and plain values (``weights_only`` loadable)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(position),
                      int(has_gauss), float(cached_gaussian)),
            "python": [int(version), list(internal), gauss_next]}


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss,
                         cached_gaussian))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _find_checkpoint(output_dir: Path) -> Optional[Path]:
    path = output_dir / "checkpoint"
    return path if (path / "state.pt").is_file() and (path / "model").is_dir() else None


def _load_state(checkpoint: Path, world: int) -> Dict[str, Any]:
    """The trainer state of ``checkpoint``, read without running any code from the file."""
    path = checkpoint / "state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise TrainingError(
            f"{path}: refusing to load it: it holds objects other than tensors and plain values "
            f"(tampered with, or written by an older version): {reason}. Delete {checkpoint} "
            f"to start afresh") from None
    if state.get("world_size", 1) != world:
        raise TrainingError(f"{checkpoint} was written by {state.get('world_size')} "
                            f"process(es); resume with the same number (now {world})")
    return state


def _save_checkpoint(output_dir: Path, embedder: Any, state: Dict[str, Any]) -> Path:
    """Write ``output_dir/checkpoint`` atomically (a crash leaves the previous one intact)."""
    target = output_dir / "checkpoint"
    with atomic_directory(target) as tmp:
        embedder.save_pretrained(tmp / "model")
        torch.save(state, tmp / "state.pt")
        summary = {k: state[k] for k in ("step", "total_steps", "epoch")}
        summary["lr_scale"] = state["pace_scales"]
        atomic_write_json(tmp / "trainer_state.json", summary)
    return target


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a resumed run starts from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            break  # a torn last line from a kill
    atomic_write_text(path, "".join(kept))


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then linear decay towards 0 (0-based step;
    no step trains with a zero lr)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Biases and norm scales are not decayed (standard for transformers).
        (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _native_cpu_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class _Cached:
    """One side (queries or keys) of a micro-batched step: the chunks embedded without
    gradients, the RNG state each started from, and their embeddings as one leaf tensor whose
    ``.grad`` the loss fills."""

    features: Dict[str, torch.Tensor]
    chunks: List[torch.Tensor]  # row indices of each chunk, longest texts first
    rng_states: List[Tuple[torch.Tensor, Optional[torch.Tensor]]]  # (cpu, cuda) per chunk
    embeddings: torch.Tensor  # [N, d] leaf, rows in input order


def _chunk_features(features: Mapping[str, torch.Tensor], rows: torch.Tensor,
                    left_padded: bool) -> Dict[str, torch.Tensor]:
    """The ``rows`` of a padded batch, cut to the longest of them (less padding)."""
    width = int(features["attention_mask"][rows].sum(dim=1).max())
    cut = slice(features["attention_mask"].shape[1] - width, None) if left_padded \
        else slice(0, width)
    return {key: value[rows][:, cut] for key, value in features.items()}


@dataclass
class _Batch:
    """One step's tensors: tokenised queries and keys, and the [B, G] candidate grids."""

    examples: List[_Example]
    queries: Dict[str, torch.Tensor]
    keys: Dict[str, torch.Tensor]  # the chosen candidates of every query, flattened
    valid_slots: List[int]  # position of each flattened key in the [B * G] grid
    rewards: torch.Tensor
    key_ids: torch.Tensor
    mask: torch.Tensor
    task_of: torch.Tensor  # [B] task index of each query
    cached: List[_Cached] = field(default_factory=list)  # micro-batching: queries, keys


class Trainer:
    """One training run; its state (model, optimizer, sampler, self-pace, step) lives on
    ``self`` and each step is a few short methods. ``train(config)`` is
    ``Trainer(config).run()``.

    Example:
        >>> trainer = Trainer({"tasks": {"tool": "labels/tool.jsonl"}, "max_steps": 40})
        >>> model_dir = trainer.run()
        >>> trainer.step
        40
    """

    def __init__(self, config: Union[TrainConfig, Mapping[str, Any], PathLike]):
        self.config = load_config(config)
        self.output_dir = Path(self.config.output_dir)
        self.log_path = self.output_dir / "log.jsonl"
        self.rank, self.world, self.device = 0, 1, torch.device("cpu")
        self.step = 0
        self.state: Optional[Dict[str, Any]] = None  # the checkpoint resumed from
        self.progress: Optional[Any] = None
        self.appender: Optional[JsonlAppender] = None
        self._created_group = False

    @property
    def main(self) -> bool:
        """Whether this process writes the outputs (rank 0)."""
        return self.rank == 0

    def run(self) -> Path:
        """Set up, train to the last step (or resume there), save; return ``output_dir/model``.

        Example:
            >>> Trainer("train.yaml").run()
            PosixPath('runs/llm-embedder/model')
        """
        self.rank, self.world, self.device, self._created_group = _setup_distributed(self.config)
        try:
            self.setup()
            self._loop()
            self._close_outputs()
            return self.save_final()
        finally:
            self._close_outputs()
            if self._created_group and dist.is_initialized():
                dist.destroy_process_group()

    # ---- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        """Check the output folder, read the data, seed, load the model (or the checkpoint
        to resume), build sampler, schedule, optimizer and losses, open the log.

        Example:
            >>> trainer = Trainer(config); trainer.setup(); trainer.total
            200
        """
        config = self.config
        self.amp_dtype = self._amp_dtype()  # before anything is written: it may refuse
        checkpoint = self._prepare_output()
        self.specs = config.task_specs()
        self.examples, self.task_names = _load_examples(self.specs, config.reward,
                                                        config.human_positives)
        _seed_everything(config.seed + self.rank)
        self.state = _load_state(checkpoint, self.world) if checkpoint is not None else None
        self.embedder = self._load_embedder(checkpoint)
        self._build_optimization()
        self.loss_fns = self._build_losses()
        if self.state is not None:
            self.resume(self.state, checkpoint)
        self.model = self._wrap_model()
        self._open_outputs()

    def _prepare_output(self) -> Optional[Path]:
        """The checkpoint to resume from, if any; refuse what must not be overwritten."""
        config, output_dir = self.config, self.output_dir
        _check_output_dir(output_dir, config.overwrite)
        if self.main:
            # A run killed inside a checkpoint swap leaves a temporary (or, mid-swap, only the
            # old version under a temporary name); a resumed run that writes no checkpoint
            # again would keep it, and reading first would miss the old version.
            clean_stale_temporaries(output_dir / "checkpoint")
        _barrier(self.world)
        checkpoint = _find_checkpoint(output_dir)
        if checkpoint is not None and not config.resume and not config.overwrite:
            raise ValueError(f"{output_dir} already holds a training checkpoint; set resume: "
                             f"true (or --resume) to continue it, overwrite: true to start "
                             f"afresh, or use another output_dir")
        if config.resume and checkpoint is None:
            logger.info("no checkpoint in %s: starting from scratch", output_dir)
        if not config.resume:
            if checkpoint is not None and self.main:
                # A later resume must never pick up the replaced run's state.
                shutil.rmtree(checkpoint)
            checkpoint = None
        return checkpoint

    def _amp_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype on this device; ConfigError where ``mixed_precision`` asks for
        one the device cannot run."""
        config, device = self.config, self.device
        if config.bf16 or config.fp16:  # the older switches: GPU only, ignored elsewhere
            if device.type != "cuda":
                logger.warning("bf16/fp16 need a GPU; training in float32 on %s", device)
                return None
            return torch.bfloat16 if config.bf16 else torch.float16
        mode = config.mixed_precision
        if mode == "fp16" and device.type != "cuda":
            raise ConfigError(f"config key 'mixed_precision': fp16 needs a CUDA GPU (training "
                              f"runs on {device}); use 'bf16' or 'no' there")
        if mode == "bf16":
            if device.type == "cuda" and not torch.cuda.is_bf16_supported():
                raise ConfigError("config key 'mixed_precision': this GPU has no bf16; use "
                                  "'fp16' or 'no'")
            if device.type not in ("cuda", "cpu"):
                raise ConfigError(f"config key 'mixed_precision': bf16 autocast is supported "
                                  f"on CUDA and CPU, not on {device}; use 'no'")
            if device.type == "cpu" and not _native_cpu_bf16():
                logger.warning("this CPU has no native bf16: bf16 autocast is emulated and "
                               "slower than float32 here")
        return MIXED_PRECISION[mode]

    def _load_embedder(self, checkpoint: Optional[Path]) -> Any:
        from .embedder import Embedder

        source = checkpoint / "model" if checkpoint is not None else self.config.model
        embedder = Embedder.from_pretrained(source, device=self.device)
        embedder.train()
        for name, param in embedder.model.named_parameters():
            # CLS/mean pooling never reads BERT's pooler head: leave it out of training (DDP
            # would otherwise wait forever for its gradients).
            if name.startswith("pooler."):
                param.requires_grad_(False)
        if self.config.gradient_checkpointing:
            # Non-reentrant: works under DDP with a model used twice per forward (queries, keys).
            kwargs = {"use_reentrant": False}
            if hasattr(embedder.model, "activation_checkpointing_enable"):  # transformers >= 5
                embedder.model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs=kwargs)
            else:
                embedder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return embedder

    def _build_optimization(self) -> None:
        """Sampler, step count and warmup, self-pace, optimizer and loss scaler."""
        config, examples = self.config, self.examples
        self.sampler = _make_sampler(config, examples, self.rank, self.world)
        self.total = config.max_steps or max(1, math.ceil((config.epochs or 1.0)
                                                          * len(self.sampler)))
        self.warmup = math.ceil(config.warmup_ratio * self.total)
        self.pace = SelfPacedScheduler(self.task_names,
                                       "self_paced" if config.self_paced else "fixed",
                                       config.s_min, config.ema, config.pace_init_batches)
        self.base_lr = config.learning_rate
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.embedder.model, config.weight_decay), lr=self.base_lr)
        self.scaler = (torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16
                       else None)

    def _build_losses(self) -> Dict[int, nn.Module]:
        """Each task's loss (config.loss, else the task spec's, else the task's own)."""
        config = self.config
        loss_fns = {}
        for index, name in enumerate(self.task_names):
            task, spec = get_task(name), self.specs[name]
            teacher = spec.teacher_temperature
            loss_fns[index] = build_loss(
                config.loss or spec.loss or task.loss,
                score_temperature=config.score_temperature,
                teacher_temperature=config.teacher_temperature if teacher is None else teacher,
                teacher_spread=config.teacher_spread,
                in_batch_negatives=task.shared_corpus,
                cross_device=config.cross_device_negatives, reduction="none")
        return loss_fns

    def resume(self, state: Mapping[str, Any], checkpoint: Path) -> None:
        """Continue from a checkpoint's state: step, optimizer, sampler, self-pace, RNGs.

        Example:
            >>> trainer.resume(_load_state(checkpoint, world=1), checkpoint)
        """
        if state["total_steps"] != self.total:
            raise TrainingError(f"{checkpoint} belongs to a run of {state['total_steps']} "
                                f"steps; this config gives {self.total} (keep max_steps/epochs, "
                                f"batch_size and the data as they were to resume)")
        if state.get("tasks") != self.task_names:
            raise TrainingError(f"{checkpoint} was trained on tasks {state.get('tasks')}; the "
                                f"config now lists {self.task_names}")
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.pace.load_state_dict(state["pace"])
        _set_rng_state(state["rng"][self.rank])
        logger.info("resuming %s at step %d of %d", checkpoint, self.step, self.total)

    def _wrap_model(self) -> nn.Module:
        if self.world == 1:
            return _DualEncoder(self.embedder)
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(_DualEncoder(self.embedder), device_ids=device_ids)

    def _open_outputs(self) -> None:
        """train_config.json, the log cut back to the resumed step, the progress bar."""
        config = self.config
        if self.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.output_dir / "train_config.json",
                              {**config.to_dict(), "world_size": self.world,
                               "total_steps": self.total})
            _truncate_log(self.log_path, self.step)
        _barrier(self.world)
        if self.main and config.progress_bar and self.step < self.total:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=self.total, initial=self.step, desc="train",
                                 unit="step", mininterval=1.0, dynamic_ncols=True)
        if self.main:
            self.appender = JsonlAppender(self.log_path)

    def _close_outputs(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.appender is not None:
            self.appender.close()
            self.appender = None

    # ---- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        config = self.config
        while self.step < self.total:
            for indices in self.sampler:
                started = time.perf_counter()
                record = self._train_step(indices)
                self.step += 1
                self._log(record, time.perf_counter() - started)
                if config.save_steps and self.step % config.save_steps == 0 \
                        and self.step < self.total:
                    self.checkpoint()
                if self.step >= self.total:
                    break
        if self.state is None or self.step > int(self.state["step"]) \
                or _find_checkpoint(self.output_dir) is None:
            self.checkpoint()

    def _train_step(self, indices: np.ndarray) -> Dict[str, Any]:
        """One optimizer step on the batch ``indices``; returns its log record."""
        batch = self._batch_tensors(indices)
        per_query = self._forward_loss(batch)
        loss = per_query.mean()
        sums, counts = self._task_sums(per_query, batch.task_of)
        seen = [t for t in range(len(self.task_names)) if counts[t] > 0]
        task_losses = {self.task_names[t]: float(sums[t] / counts[t]) for t in seen}
        lr = self._apply_lr(task_losses, counts, seen)
        self._backward_and_step(loss, batch)
        return {"task": self.task_names[seen[0]] if len(seen) == 1 else "mixed",
                "loss": float(sums.sum() / counts.sum()),
                "losses": task_losses, "lr": lr, "lr_scale": self.pace.scales(),
                "examples": int(counts.sum())}

    def _batch_tensors(self, indices: np.ndarray) -> _Batch:
        """Instruction-prefixed texts of the batch's queries and chosen candidates, tokenised,
        with the [B, G] rewards, key ids and mask of the candidate grid."""
        config, device = self.config, self.embedder.device
        examples = [self.examples[int(i)] for i in indices]
        group = config.group_size
        queries, keys, valid_slots = [], [], []
        rewards = torch.zeros(len(examples), group)
        key_ids = torch.zeros(len(examples), group, dtype=torch.long)
        mask = torch.zeros(len(examples), group, dtype=torch.bool)
        for b, (index, example) in enumerate(zip(indices, examples)):
            task = get_task(self.task_names[example.task])
            queries.append(task.instruction("query") + example.query)
            chosen = _group(example, group, config.seed, self.sampler.epoch, int(index))
            for g, c in enumerate(chosen):
                keys.append(task.instruction("key") + example.texts[c])
                valid_slots.append(b * group + g)
            rewards[b, :len(chosen)] = torch.from_numpy(example.rewards[chosen])
            key_ids[b, :len(chosen)] = torch.from_numpy(example.key_ids[chosen])
            mask[b, :len(chosen)] = True
        # Plain dicts: DDP's input handling walks dicts, not BatchEncoding.
        return _Batch(
            examples=examples,
            queries=dict(self.embedder.tokenize(queries, config.query_max_length)),
            keys=dict(self.embedder.tokenize(keys, config.key_max_length)),
            valid_slots=valid_slots, rewards=rewards.to(device), key_ids=key_ids.to(device),
            mask=mask.to(device),
            task_of=torch.tensor([e.task for e in examples], device=device))

    def _forward_loss(self, batch: _Batch) -> torch.Tensor:
        """[B] loss of each query under its task's loss."""
        device, size = self.embedder.device, len(batch.examples)
        query_rows = self._micro_rows(self.config.query_max_length)
        key_rows = self._micro_rows(self.config.key_max_length)
        if query_rows is None or key_rows is None:
            with self._autocast():
                query_emb, flat_keys = self.model(batch.queries, batch.keys)
        else:
            batch.cached = [self._embed_chunks(batch.queries, query_rows),
                            self._embed_chunks(batch.keys, key_rows)]
            query_emb, flat_keys = (cached.embeddings for cached in batch.cached)
        key_emb = flat_keys.new_zeros(size * self.config.group_size, flat_keys.shape[-1])
        key_emb = key_emb.index_copy(0, torch.tensor(batch.valid_slots, device=device),
                                     flat_keys)
        key_emb = key_emb.view(size, self.config.group_size, -1)
        # Mixed batches and multiple processes: run every loss on every rank in the same order,
        # since the cross-device gather inside a loss is a collective call.
        if self.config.batching == "mixed" and self.world > 1:
            present = list(range(len(self.task_names)))
        else:
            present = sorted({e.task for e in batch.examples})
        per_query = torch.zeros(size, device=device)
        for t in present:
            losses = self.loss_fns[t](query_emb, key_emb, batch.rewards, batch.mask,
                                      batch.key_ids)
            per_query = torch.where(batch.task_of == t, losses, per_query)
        return per_query

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _rng_snapshot(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _micro_rows(self, max_length: int) -> Optional[int]:
        """Texts per forward pass for one side (None: the whole batch in one pass)."""
        rows = self.config.micro_batch_size
        if rows != "auto":
            return rows
        if self.device.type != "cpu":  # accelerators have the memory; chunks only cost time
            return None
        return max(1, AUTO_TOKENS_PER_PASS // max_length)

    def _embed_chunks(self, features: Dict[str, torch.Tensor], rows_per_pass: int) -> _Cached:
        """Micro-batching, first pass: embed ``features`` in chunks of ``rows_per_pass`` rows
        (longest first, each cut to its own longest) without gradients, noting the RNG state
        before each chunk so the second pass draws the same dropout."""
        lengths = features["attention_mask"].sum(dim=1)
        order = torch.argsort(lengths, descending=True, stable=True)
        chunks = list(torch.split(order, rows_per_pass))
        left_padded = getattr(self.embedder.tokenizer, "padding_side", "right") == "left"
        states, parts = [], []
        with torch.no_grad(), self._autocast():
            for rows in chunks:
                states.append(self._rng_snapshot())
                parts.append(self.embedder.embed(_chunk_features(features, rows, left_padded)))
        flat = torch.cat(parts)
        embeddings = torch.empty_like(flat).index_copy_(0, order, flat)
        return _Cached(features, chunks, states, embeddings.requires_grad_())

    def _replay_chunks(self, batch: _Batch) -> None:
        """Micro-batching, second pass: each chunk again with gradients and the dropout of its
        first pass, backpropagating the loss's gradient of its embeddings into the encoder.
        Gradients add up over the chunks; under DDP only the last chunk goes through the DDP
        wrapper, whose backward then averages the sum over ranks (one collective per step
        whatever the number of chunks on each rank)."""
        left_padded = getattr(self.embedder.tokenizer, "padding_side", "right") == "left"
        jobs = [(cached, rows, state) for cached in batch.cached
                for rows, state in zip(cached.chunks, cached.rng_states)]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # afterwards the stream goes on as it was
            for index, (cached, rows, (cpu_state, cuda_state)) in enumerate(jobs):
                torch.set_rng_state(cpu_state)
                if cuda_state is not None:
                    torch.cuda.set_rng_state(cuda_state, self.device)
                grad = cached.embeddings.grad
                grad = torch.zeros_like(cached.embeddings) if grad is None else grad
                features = _chunk_features(cached.features, rows, left_padded)
                with self._autocast():
                    if index == len(jobs) - 1:
                        embeddings = self.model(features)[0]
                    else:
                        embeddings = self.embedder.embed(features)
                embeddings.backward(grad[rows])

    def _task_sums(self, per_query: torch.Tensor, task_of: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-task loss sums and query counts over all ranks (float64, on the CPU): the same
        numbers everywhere, so every rank takes the same lr and sees the same NaN."""
        stats = torch.zeros(2, len(self.task_names), dtype=torch.float64,
                            device=per_query.device)
        stats[0].index_add_(0, task_of, per_query.detach().double())
        stats[1].index_add_(0, task_of, torch.ones_like(per_query, dtype=torch.float64))
        stats = _all_reduce_sum(stats, self.world).cpu()
        return stats[0], stats[1]

    def _apply_lr(self, task_losses: Mapping[str, float], counts: torch.Tensor,
                  seen: Sequence[int]) -> float:
        """Stop on a non-finite loss; else update the self-pace and set this step's lr."""
        for name, value in task_losses.items():
            if not math.isfinite(value):
                raise TrainingError(
                    f"loss is {value} at step {self.step + 1} (task {name!r}); the last "
                    f"checkpoint is kept. Try a lower lr, bf16 instead of fp16, or check that "
                    f"task's rewards")
        scales = {name: self.pace.update(name, value) for name, value in task_losses.items()}
        factor = sum(scales[self.task_names[t]] * float(counts[t]) for t in seen) \
            / float(counts.sum())
        lr = self.base_lr * _lr_factor(self.step, self.total, self.warmup) * factor
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        return lr

    def _backward_and_step(self, loss: torch.Tensor, batch: _Batch) -> None:
        optimizer, scaler = self.optimizer, self.scaler
        params = [p for g in optimizer.param_groups for p in g["params"]]
        (loss if scaler is None else scaler.scale(loss)).backward()
        if batch.cached:
            self._replay_chunks(batch)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cpu":
            # Each step's activations (chunks of varying width) fragment glibc's heap; handing
            # the free pages back keeps the run's resident memory from creeping up step by step.
            return_free_heap()

    def _log(self, record: Dict[str, Any], elapsed: float) -> None:
        """Append the step's record to log.jsonl; progress bar and console line."""
        record.update(step=self.step, epoch=self.sampler.epoch,
                      examples_per_s=record.pop("examples") / max(elapsed, 1e-9))
        if self.appender is not None:
            self.appender.append(record)
        if self.progress is not None:
            self.progress.set_postfix(task=record["task"], loss=f"{record['loss']:.4f}",
                                      refresh=False)
            self.progress.update(1)
        if self.main and (self.step % self.config.log_every == 0 or self.step == self.total):
            logger.info("step %d/%d %s loss %.4f lr %.3g", self.step, self.total, record["task"],
                        record["loss"], record["lr"])

    # ---- outputs ----------------------------------------------------------------------------

    def snapshot(self) -> Dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain values (every rank calls it:
        the RNG states of all ranks are gathered).

        Example:
            >>> torch.save(trainer.snapshot(), "state.pt")  # loads with weights_only=True
        """
        rng_states = _gather_objects(_rng_state(), self.world)
        return {
            "step": self.step, "total_steps": self.total, "warmup_steps": self.warmup,
            "epoch": self.sampler.epoch, "tasks": self.task_names, "world_size": self.world,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": self.sampler.state_dict(), "pace": self.pace.state_dict(),
            "pace_scales": self.pace.scales(), "rng": rng_states,
            "config": self.config.to_dict(),
        }

    def checkpoint(self) -> None:
        """Write ``output_dir/checkpoint`` (rank 0) from every rank's state.

        Example:
            >>> trainer.checkpoint()  # on every rank
        """
        snap = self.snapshot()
        if self.main:
            _save_checkpoint(self.output_dir, self.embedder, snap)
        _barrier(self.world)

    def save_final(self) -> Path:
        """Save the trained model to ``output_dir/model`` and draw training.png; return it.

        Example:
            >>> trainer.save_final()
            PosixPath('runs/llm-embedder/model')
        """
        final = self.output_dir / "model"
        if self.main:
            if self.config.interpolate_with_start < 1:
                self._interpolate_with_start(self.config.interpolate_with_start)
            self.embedder.save_pretrained(final)
            if self.config.plot and self.log_path.is_file():
                self._plot()
        _barrier(self.world)
        return final

    def _interpolate_with_start(self, alpha: float) -> None:
        """Weights <- alpha * trained + (1 - alpha) * start (WiSE-FT), in place; the start
        model is read again from ``config.model`` (a resumed run has no copy of it)."""
        from .embedder import Embedder

        start = Embedder.from_pretrained(self.config.model, device="cpu").model.state_dict()
        with torch.no_grad():
            for name, tensor in self.embedder.model.state_dict().items():
                if name not in start or not tensor.is_floating_point():
                    continue  # integer buffers (position ids) are not weights
                if start[name].shape != tensor.shape:
                    raise ValueError(
                        f"interpolate_with_start: tensor {name!r} has shape "
                        f"{tuple(start[name].shape)} in the start model {self.config.model!r} "
                        f"but {tuple(tensor.shape)} in the trained one")
                tensor.mul_(alpha).add_(start[name].to(tensor), alpha=1 - alpha)
        logger.info("saved weights: %.2f x trained + %.2f x start model", alpha, 1 - alpha)

    def _plot(self) -> None:
        try:
            plot_training(self.log_path, self.output_dir / "training.png")
        except ImportError as exc:
            logger.warning("training.png skipped: %s", exc)
        except Exception as exc:  # a plot must never cost the trained model
            logger.warning("could not draw training.png: %s", exc)


def train(config: Union[TrainConfig, Mapping[str, Any], PathLike]) -> Path:
    """Train an embedder; return the final model folder ``output_dir/model``.

    ``config``: a :class:`TrainConfig`, a dict of its fields, or a YAML/JSON file of them.
    Works as is under ``torchrun`` (one process per device).

    Raises ConfigError naming the key for a bad config, FileNotFoundError for a missing
    labelled file, ValueError (DataError) for malformed labels, FolderNotOursError for an
    ``output_dir`` holding other files, :class:`TrainingError` for a NaN loss (naming step
    and task) or a checkpoint that does not match the config or is not safe to load.

    Example:
        >>> train({"tasks": {"tool": "labels/tool.jsonl"}, "output_dir": "runs/tool",
        ...        "max_steps": 40, "batch_size": 16, "group_size": 4})
        PosixPath('runs/tool/model')
    """
    return Trainer(config).run()


# --------------------------------------------------------------------------------------------
# Plot and CLI
# --------------------------------------------------------------------------------------------


def plot_training(log_path: PathLike, out_path: PathLike) -> Path:
    """Draw per-task loss and self-paced lr scale against step from a ``log.jsonl``, written
    atomically. Raises ImportError when matplotlib is not installed.

    Example:
        >>> plot_training("runs/demo/log.jsonl", "runs/demo/training.png")
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("matplotlib is not installed (pip install matplotlib to get "
                          "training.png)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()
               if line.strip()]
    if not records:
        raise ValueError(f"{log_path} holds no training steps to plot")
    tasks = sorted({t for r in records for t in r["lr_scale"]})
    fig, (ax_loss, ax_scale) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    try:
        for task in tasks:
            _plot_task(ax_loss, ax_scale, records, task)
        ax_loss.set_ylabel("training loss")
        ax_loss.legend(loc="upper right")
        ax_loss.grid(alpha=0.3)
        ax_scale.set_ylabel("self-paced lr scale")
        ax_scale.set_xlabel("step")
        ax_scale.set_ylim(0, 1.05)
        ax_scale.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_file(out_path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return Path(out_path)


def _plot_task(ax_loss: Any, ax_scale: Any, records: Sequence[Dict[str, Any]],
               task: str) -> None:
    points = [(r["step"], r["losses"][task]) for r in records if task in r["losses"]]
    if points:
        steps, values = zip(*points)
        line, = ax_loss.plot(steps, values, ".", alpha=0.35, markersize=4)
        window = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1:], smooth, color=line.get_color(), label=task)
    ax_scale.plot([r["step"] for r in records], [r["lr_scale"][task] for r in records],
                  label=task)


def main_train(config_path: str) -> int:
    """``python -m llm_embedder.train CONFIG`` (also under torchrun); returns an exit code.

    Example:
        >>> main_train("train.yaml")
        0
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model_dir = train(config_path)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"model written to {model_dir}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m llm_embedder.train CONFIG.yaml", file=sys.stderr)
        sys.exit(2)
    sys.exit(main_train(sys.argv[1]))
