"""Multi-task training from the frozen LLM's labels (DESIGN.md §4, §5, §8).

``train(config)`` fine-tunes an :class:`~llm_embedder.Embedder` on labelled files of one or
more tasks: each step takes a homogeneous batch (one task, length-bucketed), builds for every
query a group of candidates (its best-rewarded candidate plus negatives), embeds queries and
keys with their task instructions, and applies the task's loss (graded distillation, KL
distillation or contrastive). The learning rate of a step is
``lr · schedule(step) · clip(L̄_t / L⁰_t, s_min, 1)`` for the batch's task t (self-paced).

It runs unchanged under ``torchrun --nproc_per_node N`` (gloo on CPU, nccl on GPUs): every
rank takes its share of the same task's batch, keys of all ranks serve as negatives, and rank 0
writes the checkpoints, the log and the model. Checkpoints are written atomically; a killed run
continues with ``resume=True`` and ends with the weights an uninterrupted run would have.

Outputs in ``output_dir``: ``model/`` (the final :class:`Embedder` folder), ``checkpoint/``
(model + optimizer, schedule, sampler position, self-pace state, RNG states),
``log.jsonl`` (one line a step), ``training.png`` and ``train_config.json``.

Example:
    >>> from llm_embedder import train
    >>> model_dir = train({"tasks": {"qa": "labels/qa.jsonl", "chat": "labels/chat.jsonl"},
    ...                    "output_dir": "runs/demo", "max_steps": 200, "batch_size": 32})
    >>> Embedder.from_pretrained(model_dir)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .data import DataError, LabelledQuery, load_labelled
from .io import JsonlAppender, atomic_directory, atomic_write_json, atomic_write_text
from .losses import build_loss
from .sampler import HomogeneousBatchSampler, SelfPacedScheduler
from .tasks import get_task

logger = logging.getLogger(__name__)

__all__ = [
    "TaskSpec",
    "TrainConfig",
    "TrainingError",
    "load_config",
    "main_train",
    "plot_training",
    "train",
]

PathLike = Union[str, "os.PathLike[str]"]

LOSSES = ("graded", "kl", "contrastive")
REWARDS = ("rank", "likelihood")
# lr when none is given: the reference's 5e-6 suits BERT-base-sized encoders; the packaged
# MiniLM (22M parameters) learns far too slowly with it.
DEFAULT_LR_PACKAGED = 5e-5
DEFAULT_LR = 5e-6


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, a checkpoint that does not fit the config, ...)."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class TaskSpec:
    """One task's training data: the labelled file, and optionally its loss and reward."""

    file: str
    loss: Optional[str] = None  # "graded" | "kl" | "contrastive"; default: the task's own
    reward: Optional[str] = None  # "rank" | "likelihood"; default: TrainConfig.reward


@dataclass
class TrainConfig:
    """Everything ``train`` needs. Fields after ``tasks`` have defaults.

    ``tasks`` maps a registered task name to its labelled file (the labeller's output), or to
    ``{"file": path, "loss": "graded|kl|contrastive", "reward": "rank|likelihood"}``.
    Relative paths are relative to the current directory.
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
    reward: str = "rank"  # "rank" (rank-aware) | "likelihood" (the reference's reward)
    batching: str = "homogeneous"  # | "mixed" (ablation: all tasks pooled in each batch)
    self_paced: bool = True  # False: fixed lr for every task (ablation)
    s_min: float = 0.1  # lowest self-paced lr factor
    ema: float = 0.9  # decay of the per-task loss EMA
    pace_init_batches: int = 3  # batches of a task that define its initial loss L⁰
    temperature: float = 0.01  # tau: s = cos(q, k) / tau
    reward_temperature: float = 0.1  # T_r of graded distillation: w = softmax(r / T_r)
    kl_temperature: float = 0.1  # T_t of KL distillation: softmax(r / T_t)
    task_temperature: float = 1.0  # task sampling: 1 = proportional to size
    cross_device_negatives: bool = True
    seed: int = 0
    save_steps: int = 500  # checkpoint every this many steps (0: only at the end)
    resume: bool = False  # continue from output_dir/checkpoint when there is one
    overwrite: bool = False  # start afresh even if output_dir holds a checkpoint
    bf16: bool = False  # GPU only (bf16 on this kind of CPU is 7x slower: ignored there)
    fp16: bool = False  # GPU only, with loss scaling
    gradient_checkpointing: bool = False
    device: Optional[str] = None  # default: cuda (this process's GPU) when available, else cpu
    log_every: int = 10  # console log line every this many steps (log.jsonl gets every step)
    progress_bar: bool = True
    plot: bool = True  # write training.png at the end

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a plain dict (e.g. parsed YAML); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**dict(values))

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tasks"] = {name: dataclasses.asdict(spec) for name, spec in self.task_specs().items()}
        return out

    def task_specs(self) -> Dict[str, TaskSpec]:
        """``tasks`` normalised to :class:`TaskSpec` (validated)."""
        if not isinstance(self.tasks, Mapping) or not self.tasks:
            raise ValueError("config 'tasks' must map at least one task name to a labelled file")
        specs: Dict[str, TaskSpec] = {}
        for name, value in self.tasks.items():
            get_task(name)  # ValueError listing the known tasks
            if isinstance(value, TaskSpec):
                spec = value
            elif isinstance(value, (str, os.PathLike)):
                spec = TaskSpec(file=os.fspath(value))
            elif isinstance(value, Mapping):
                extra = sorted(set(value) - {"file", "loss", "reward"})
                if extra or "file" not in value:
                    raise ValueError(f"tasks.{name} must be a path or {{file, loss?, reward?}}; "
                                     f"got keys {sorted(value)}")
                spec = TaskSpec(file=os.fspath(value["file"]), loss=value.get("loss"),
                                reward=value.get("reward"))
            else:
                raise ValueError(f"tasks.{name} must be a path or a mapping, got "
                                 f"{type(value).__name__}")
            if spec.loss is not None and spec.loss not in LOSSES:
                raise ValueError(f"tasks.{name}.loss must be one of {LOSSES}, got {spec.loss!r}")
            if spec.reward is not None and spec.reward not in REWARDS:
                raise ValueError(f"tasks.{name}.reward must be one of {REWARDS}, "
                                 f"got {spec.reward!r}")
            specs[name] = spec
        return specs

    def validate(self) -> None:
        self.task_specs()
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.group_size >= 1, "group_size must be >= 1"),
            (self.query_max_length >= 2 and self.key_max_length >= 2,
             "query_max_length and key_max_length must be >= 2"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.epochs is None or self.epochs > 0, "epochs must be > 0"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
            (self.loss is None or self.loss in LOSSES, f"loss must be one of {LOSSES} or null"),
            (self.reward in REWARDS, f"reward must be one of {REWARDS}"),
            (self.batching in ("homogeneous", "mixed"),
             "batching must be 'homogeneous' or 'mixed'"),
            (0 < self.s_min <= 1, "s_min must be in (0, 1]"),
            (0 <= self.ema < 1, "ema must be in [0, 1)"),
            (self.pace_init_batches >= 1, "pace_init_batches must be >= 1"),
            (min(self.temperature, self.reward_temperature, self.kl_temperature,
                 self.task_temperature) > 0, "temperatures must be > 0"),
            (self.save_steps >= 0, "save_steps must be >= 0"),
            (not (self.bf16 and self.fp16), "choose at most one of bf16 and fp16"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (isinstance(self.seed, int) and self.seed >= 0, "seed must be an int >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid training config: {message}")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return DEFAULT_LR_PACKAGED if self.model is None else DEFAULT_LR


def load_config(source: Union[TrainConfig, Mapping[str, Any], PathLike]) -> TrainConfig:
    """A :class:`TrainConfig` from itself, a dict, or a YAML/JSON file.

    Example:
        >>> config = load_config("train.yaml")
    """
    if isinstance(source, TrainConfig):
        config = dataclasses.replace(source)
    elif isinstance(source, Mapping):
        config = TrainConfig.from_dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} not found")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".json":
                values = json.loads(text)
            else:
                import yaml

                values = yaml.safe_load(text)
        except Exception as exc:  # yaml and json raise different types; both mean "malformed"
            raise ValueError(f"{path}: cannot parse the config ({exc})") from None
        if not isinstance(values, Mapping):
            raise ValueError(f"{path}: the config must be a mapping of keys to values")
        try:
            config = TrainConfig.from_dict(values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
    config.validate()
    return config


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


def _load_examples(specs: Mapping[str, TaskSpec], reward_default: str
                   ) -> Tuple[List[_Example], List[str]]:
    names = list(specs)
    examples: List[_Example] = []
    for task_index, (name, spec) in enumerate(specs.items()):
        path = Path(spec.file)
        if not path.is_file():
            raise FileNotFoundError(f"labelled file for task {name!r} not found: {path} "
                                    f"(resolved: {path.resolve()}); run `llm-embedder label` "
                                    f"first")
        reward_name = spec.reward or reward_default
        records: List[LabelledQuery] = load_labelled(path)
        for record in records:
            if record.task != name:
                raise DataError(path, None, f"query {record.query_id!r} is labelled for task "
                                            f"{record.task!r}, but the file is configured for "
                                            f"task {name!r}")
            values = (record.rank_rewards if reward_name == "rank"
                      else record.likelihood_rewards)
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
            examples.append(_Example(
                task=task_index, query=record.query, texts=texts, rewards=reward_array,
                key_ids=np.asarray([_text_id(t) for t in texts], dtype=np.int64),
                order=np.argsort(-reward_array, kind="stable")))
    return examples, names


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
    """Queries and keys in one forward call, so DDP sees one forward per backward."""

    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.embedder = embedder

    def forward(self, queries: Mapping[str, torch.Tensor], keys: Mapping[str, torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.embedder.embed(queries), self.embedder.embed(keys)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _find_checkpoint(output_dir: Path) -> Optional[Path]:
    path = output_dir / "checkpoint"
    return path if (path / "state.pt").is_file() and (path / "model").is_dir() else None


def _save_checkpoint(output_dir: Path, embedder: Any, state: Dict[str, Any]) -> Path:
    """Write ``output_dir/checkpoint`` atomically (a crash leaves the previous one intact)."""
    target = output_dir / "checkpoint"
    with atomic_directory(target) as tmp:
        embedder.save_pretrained(tmp / "model")
        torch.save(state, tmp / "state.pt")
        summary = {k: state[k] for k in ("step", "total_steps", "epoch")}
        summary["lr_scale"] = state["pace_scales"]
        (tmp / "trainer_state.json").write_text(json.dumps(summary, indent=2) + "\n")
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
# The loop
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


def train(config: Union[TrainConfig, Mapping[str, Any], PathLike]) -> Path:
    """Train an embedder; return the final model folder ``output_dir/model``.

    ``config``: a :class:`TrainConfig`, a dict of its fields, or a YAML/JSON file of them.
    Works as is under ``torchrun`` (one process per device).

    Raises FileNotFoundError for a missing labelled file, ValueError (DataError) for unknown
    tasks or malformed labels, :class:`TrainingError` for a NaN loss (naming step and task) or
    a checkpoint that does not match the config.

    Example:
        >>> train({"tasks": {"tool": "labels/tool.jsonl"}, "output_dir": "runs/tool",
        ...        "max_steps": 40, "batch_size": 16, "group_size": 4})
        PosixPath('runs/tool/model')
    """
    config = load_config(config)
    rank, world, device, created_group = _setup_distributed(config)
    try:
        return _train(config, rank, world, device)
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, rank: int, world: int, device: torch.device) -> Path:
    from .embedder import Embedder

    main = rank == 0
    output_dir = Path(config.output_dir)
    checkpoint = _find_checkpoint(output_dir)
    if checkpoint is not None and not config.resume and not config.overwrite:
        raise ValueError(f"{output_dir} already holds a training checkpoint; set resume: true "
                         f"(or --resume) to continue it, overwrite: true to start afresh, or "
                         f"use another output_dir")
    if config.resume and checkpoint is None:
        logger.info("no checkpoint in %s: starting from scratch", output_dir)
    if not config.resume:
        if checkpoint is not None and rank == 0:
            # A later resume must never pick up the replaced run's state.
            shutil.rmtree(checkpoint)
        checkpoint = None
    specs = config.task_specs()
    examples, task_names = _load_examples(specs, config.reward)

    random.seed(config.seed + rank)
    np.random.seed((config.seed + rank) % 2**32)
    torch.manual_seed(config.seed + rank)

    amp_dtype: Optional[torch.dtype] = None
    if config.bf16 or config.fp16:
        if device.type == "cuda":
            amp_dtype = torch.bfloat16 if config.bf16 else torch.float16
        else:
            logger.warning("bf16/fp16 need a GPU; training in float32 on %s", device)

    state: Optional[Dict[str, Any]] = None
    if checkpoint is not None:
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
        if state.get("world_size", 1) != world:
            raise TrainingError(f"{checkpoint} was written by {state.get('world_size')} "
                                f"process(es); resume with the same number (now {world})")
        embedder = Embedder.from_pretrained(checkpoint / "model", device=device)
    else:
        embedder = Embedder.from_pretrained(config.model, device=device)
    embedder.train()
    for name, param in embedder.model.named_parameters():
        # CLS/mean pooling never reads BERT's pooler head: leave it out of training (DDP would
        # otherwise wait forever for its gradients).
        if name.startswith("pooler."):
            param.requires_grad_(False)
    if config.gradient_checkpointing:
        # Non-reentrant: works under DDP with a model used twice per forward (queries, keys).
        kwargs = {"use_reentrant": False}
        if hasattr(embedder.model, "activation_checkpointing_enable"):  # transformers >= 5.x
            embedder.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            embedder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    sampler = HomogeneousBatchSampler(
        [e.task for e in examples],
        [len(e.query) + sum(len(t) for t in e.texts) // len(e.texts) for e in examples],
        config.batch_size, config.seed, mixed=config.batching == "mixed",
        task_temperature=config.task_temperature, rank=rank, world_size=world)
    total = config.max_steps or max(1, math.ceil((config.epochs or 1.0) * len(sampler)))
    warmup = math.ceil(config.warmup_ratio * total)
    pace = SelfPacedScheduler(task_names, "self_paced" if config.self_paced else "fixed",
                              config.s_min, config.ema, config.pace_init_batches)
    base_lr = config.learning_rate
    optimizer = torch.optim.AdamW(_param_groups(embedder.model, config.weight_decay), lr=base_lr)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    loss_fns = {}
    for index, name in enumerate(task_names):
        task = get_task(name)
        loss_name = config.loss or specs[name].loss or task.loss
        loss_fns[index] = build_loss(
            loss_name, temperature=config.temperature,
            reward_temperature=config.kl_temperature if loss_name == "kl"
            else config.reward_temperature,
            in_batch_negatives=task.shared_corpus,
            cross_device=config.cross_device_negatives, reduction="none")

    step = 0
    if state is not None:
        if state["total_steps"] != total:
            raise TrainingError(f"{checkpoint} belongs to a run of {state['total_steps']} steps; "
                                f"this config gives {total} (keep max_steps/epochs, batch_size "
                                f"and the data as they were to resume)")
        if state.get("tasks") != task_names:
            raise TrainingError(f"{checkpoint} was trained on tasks {state.get('tasks')}; the "
                                f"config now lists {task_names}")
        step = int(state["step"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        pace.load_state_dict(state["pace"])
        _set_rng_state(state["rng"][rank])
        logger.info("resuming %s at step %d of %d", checkpoint, step, total)

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model: nn.Module = DistributedDataParallel(
            _DualEncoder(embedder), device_ids=[device.index] if device.type == "cuda" else None)
    else:
        model = _DualEncoder(embedder)

    log_path = output_dir / "log.jsonl"
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / "train_config.json", {**config.to_dict(),
                                                             "world_size": world,
                                                             "total_steps": total})
        if step == 0 and log_path.exists():
            log_path.unlink()
        _truncate_log(log_path, step)
    _barrier(world)

    def snapshot() -> Dict[str, Any]:
        rng_states = _gather_objects(_rng_state(), world)
        return {
            "step": step, "total_steps": total, "warmup_steps": warmup, "epoch": sampler.epoch,
            "tasks": task_names, "world_size": world, "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "sampler": sampler.state_dict(), "pace": pace.state_dict(),
            "pace_scales": pace.scales(), "rng": rng_states, "config": config.to_dict(),
        }

    def checkpoint_now() -> None:
        snap = snapshot()  # every rank: the RNG states are gathered
        if main:
            _save_checkpoint(output_dir, embedder, snap)
        _barrier(world)

    progress = None
    if main and config.progress_bar and step < total:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, initial=step, desc="train", unit="step", mininterval=1.0,
                        dynamic_ncols=True)
    appender = JsonlAppender(log_path) if main else None
    try:
        while step < total:
            for indices in sampler:
                started = time.perf_counter()
                record = _train_step(
                    model, embedder, examples, indices, sampler.epoch, step, total, warmup,
                    base_lr, config, loss_fns, pace, task_names, optimizer, scaler, amp_dtype,
                    world)
                step += 1
                elapsed = time.perf_counter() - started
                record.update(step=step, epoch=sampler.epoch,
                              examples_per_s=record.pop("examples") / max(elapsed, 1e-9))
                if appender is not None:
                    appender.append(record)
                if progress is not None:
                    progress.set_postfix(task=record["task"], loss=f"{record['loss']:.4f}",
                                         refresh=False)
                    progress.update(1)
                if main and (step % config.log_every == 0 or step == total):
                    logger.info("step %d/%d %s loss %.4f lr %.3g", step, total, record["task"],
                                record["loss"], record["lr"])
                if config.save_steps and step % config.save_steps == 0 and step < total:
                    checkpoint_now()
                if step >= total:
                    break
        if state is None or step > int(state["step"]) or _find_checkpoint(output_dir) is None:
            checkpoint_now()
    finally:
        if progress is not None:
            progress.close()
        if appender is not None:
            appender.close()

    final = output_dir / "model"
    if main:
        embedder.save_pretrained(final)
        if config.plot and log_path.is_file():
            try:
                plot_training(log_path, output_dir / "training.png")
            except Exception as exc:  # a plot must never cost the trained model
                logger.warning("could not draw training.png: %s", exc)
    _barrier(world)
    return final


def _train_step(model: nn.Module, embedder: Any, examples: Sequence[_Example],
                indices: np.ndarray, epoch: int, step: int, total: int, warmup: int,
                base_lr: float, config: TrainConfig, loss_fns: Mapping[int, nn.Module],
                pace: SelfPacedScheduler, task_names: Sequence[str],
                optimizer: torch.optim.Optimizer, scaler: Optional[Any],
                amp_dtype: Optional[torch.dtype], world: int) -> Dict[str, Any]:
    device = embedder.device
    batch = [examples[int(i)] for i in indices]
    group = config.group_size
    queries, keys, valid_slots = [], [], []
    rewards = torch.zeros(len(batch), group)
    key_ids = torch.zeros(len(batch), group, dtype=torch.long)
    mask = torch.zeros(len(batch), group, dtype=torch.bool)
    for b, (index, example) in enumerate(zip(indices, batch)):
        task = get_task(task_names[example.task])
        queries.append(task.instruction("query") + example.query)
        chosen = _group(example, group, config.seed, epoch, int(index))
        for g, c in enumerate(chosen):
            keys.append(task.instruction("key") + example.texts[c])
            valid_slots.append(b * group + g)
        rewards[b, :len(chosen)] = torch.from_numpy(example.rewards[chosen])
        key_ids[b, :len(chosen)] = torch.from_numpy(example.key_ids[chosen])
        mask[b, :len(chosen)] = True
    rewards, key_ids, mask = rewards.to(device), key_ids.to(device), mask.to(device)
    # Plain dicts: DDP's input handling walks dicts, not BatchEncoding.
    query_batch = dict(embedder.tokenize(queries, config.query_max_length))
    key_batch = dict(embedder.tokenize(keys, config.key_max_length))

    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else _null_context())
    with autocast:
        query_emb, flat_keys = model(query_batch, key_batch)
    key_emb = flat_keys.new_zeros(len(batch) * group, flat_keys.shape[-1])
    key_emb = key_emb.index_copy(0, torch.tensor(valid_slots, device=device), flat_keys)
    key_emb = key_emb.view(len(batch), group, -1)

    task_of = torch.tensor([e.task for e in batch], device=device)
    # Mixed batches and multiple processes: run every loss on every rank in the same order,
    # since the cross-device gather inside a loss is a collective call.
    if config.batching == "mixed" and world > 1:
        present = list(range(len(task_names)))
    else:
        present = sorted({e.task for e in batch})
    per_query = torch.zeros(len(batch), device=device)
    for t in present:
        losses = loss_fns[t](query_emb, key_emb, rewards, mask, key_ids)
        per_query = torch.where(task_of == t, losses, per_query)
    loss = per_query.mean()

    # Per-task sums and counts over all ranks: the same numbers everywhere, so every rank
    # takes the same lr and sees the same NaN.
    stats = torch.zeros(2, len(task_names), dtype=torch.float64, device=device)
    stats[0].index_add_(0, task_of, per_query.detach().double())
    stats[1].index_add_(0, task_of, torch.ones_like(per_query, dtype=torch.float64))
    stats = _all_reduce_sum(stats, world).cpu()
    counts = stats[1]
    seen = [t for t in range(len(task_names)) if counts[t] > 0]
    task_label = task_names[seen[0]] if len(seen) == 1 else "mixed"
    task_losses = {task_names[t]: float(stats[0, t] / counts[t]) for t in seen}
    for name, value in task_losses.items():
        if not math.isfinite(value):
            raise TrainingError(
                f"loss is {value} at step {step + 1} (task {name!r}); the last checkpoint is "
                f"kept. Try a lower lr, bf16 instead of fp16, or check that task's rewards")
    scales = {name: pace.update(name, value) for name, value in task_losses.items()}
    factor = sum(scales[task_names[t]] * float(counts[t]) for t in seen) / float(counts.sum())
    lr = base_lr * _lr_factor(step, total, warmup) * factor
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr

    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    return {"task": task_label,
            "loss": float(stats[0].sum() / counts.sum()),
            "losses": task_losses, "lr": lr, "lr_scale": pace.scales(),
            "examples": int(counts.sum())}


class _null_context:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# --------------------------------------------------------------------------------------------
# Plot and CLI
# --------------------------------------------------------------------------------------------


def plot_training(log_path: PathLike, out_path: PathLike) -> Path:
    """Draw per-task loss and self-paced lr scale against step from a ``log.jsonl``.

    Example:
        >>> plot_training("runs/demo/log.jsonl", "runs/demo/training.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()
               if line.strip()]
    if not records:
        raise ValueError(f"{log_path} holds no training steps to plot")
    tasks = sorted({t for r in records for t in r["lr_scale"]})
    fig, (ax_loss, ax_scale) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for task in tasks:
        points = [(r["step"], r["losses"][task]) for r in records if task in r["losses"]]
        if points:
            steps, values = zip(*points)
            line, = ax_loss.plot(steps, values, ".", alpha=0.35, markersize=4)
            window = max(1, len(values) // 20)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax_loss.plot(steps[window - 1:], smooth, color=line.get_color(), label=task)
        scale_steps = [r["step"] for r in records]
        ax_scale.plot(scale_steps, [r["lr_scale"][task] for r in records], label=task)
    ax_loss.set_ylabel("training loss")
    ax_loss.legend(loc="upper right")
    ax_loss.grid(alpha=0.3)
    ax_scale.set_ylabel("self-paced lr scale")
    ax_scale.set_xlabel("step")
    ax_scale.set_ylim(0, 1.05)
    ax_scale.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def main_train(config_path: str) -> int:
    """``python -m llm_embedder.train CONFIG`` (also under torchrun); returns an exit code."""
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
