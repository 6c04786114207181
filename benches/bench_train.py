"""Training throughput and peak memory: ``llm_embedder.train`` against sentence-transformers.

Both train the packaged all-MiniLM-L6-v2 on the same batches of the bundled knowledge (qa) data,
labelled without an LLM (``label(..., method="labels")``: the labelled passage is the positive,
BM25 supplies ``group_size - 1`` hard negatives), with the same batch size, group, max lengths,
lr schedule, instructions and number of steps, each in its own child process:

- ours: ``llm_embedder.train`` (the qa task's graded-distillation loss with in-batch negatives;
  with ``--micro-batch-size N`` its GradCache micro-batching, N texts per forward pass);
- peer: ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss`` over
  (query, positive, negative_1..negative_{G-1}) — or, with ``--micro-batch-size N``,
  ``CachedMultipleNegativesRankingLoss(mini_batch_size=N)`` — fed our batches in our order.

Throughput is queries (examples) per second over the steps after the first (the first pays for
allocations); peak memory is the child's resident high-water mark (VmHWM), loading included.
Prints a Markdown table and, as its last line,
``train: ours X ex/s, sentence-transformers Y ex/s, ratio R, peak RSS G GB`` (G: ours).

    python benches/bench_train.py                         # batch 8, group 8, length 256,
                                                          # 4 steps, micro-batches of 4
    python benches/bench_train.py --micro-batch-size 0    # whole batch: ours vs plain MNRL
    python benches/bench_train.py --steps 2 --max-length 128 --batch-size 4   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BUNDLED = Path(__file__).resolve().parents[1] / "python" / "llm_embedder" / "bundled"


def peak_rss_gb() -> float:
    """This process's resident-memory high-water mark (VmHWM), in GB (1e9 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    import resource  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


def throughput(step_seconds: List[float], batch_size: int) -> float:
    """Examples/s over the steps after the first (all of them when there is only one)."""
    timed = step_seconds[1:] or step_seconds
    return batch_size * len(timed) / sum(timed)


# ------------------------------------------------------------------------------ the parent


def make_labels(folder: Path, group_size: int, limit: Optional[int]) -> Path:
    """The bundled qa training queries labelled without an LLM, group_size - 1 negatives."""
    from llm_embedder.label import label

    path = folder / "qa.labels.jsonl"
    root = BUNDLED / "qa" / "xquad"
    label("qa", root / "queries.train.jsonl", root / "corpus.jsonl", path, method="labels",
          num_negatives=group_size - 1, negatives="bm25", limit=limit, show_progress=False)
    return path


def peer_rows(config: Dict[str, Any]) -> List[Dict[str, str]]:
    """Our first ``max_steps`` batches, in our order, as sentence-transformers rows (query,
    positive, negatives), each text with the instruction ours prepends."""
    from llm_embedder import train as train_module
    from llm_embedder.tasks import get_task

    trainer_config = train_module.load_config(config)
    examples, names = train_module._load_examples(trainer_config.task_specs(),
                                                  trainer_config.reward)
    sampler = train_module._make_sampler(trainer_config, examples)
    group = trainer_config.group_size
    rows: List[Dict[str, str]] = []
    batches = iter(sampler)
    for _ in range(trainer_config.max_steps):
        for index in next(batches):
            example = examples[int(index)]
            task = get_task(names[example.task])
            chosen = train_module._group(example, group, trainer_config.seed, 0, int(index))
            if len(chosen) != group:
                sys.exit(f"query {example.query!r} has {len(chosen)} candidates, not {group}: "
                         f"label with more negatives")
            texts = [task.instruction("key") + example.texts[c] for c in chosen]
            row = {"query": task.instruction("query") + example.query, "positive": texts[0]}
            row.update({f"negative_{i}": text for i, text in enumerate(texts[1:], 1)})
            rows.append(row)
    return rows


def run_child(kind: str, spec: Path) -> Dict[str, Any]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--child", kind, "--spec", str(spec)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{kind} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - started
    return out


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per system")
    parser.add_argument("--batch-size", type=int, default=8, help="queries per step")
    parser.add_argument("--group-size", type=int, default=8, help="candidates per query")
    parser.add_argument("--max-length", type=int, default=256, help="query and key max tokens")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="texts per forward pass (ours: micro_batch_size; peer: "
                             "CachedMNRL mini_batch_size); 0: the whole batch (peer: MNRL); "
                             "default: ours 'auto' (its default), the peer the same number")
    parser.add_argument("--queries", type=int, default=None,
                        help="label only the first N training queries (default: all 784)")
    parser.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.spec.read_text())
        print(json.dumps(child_ours(spec) if args.child == "ours" else child_peer(spec)))
        return
    if args.steps < 1 or args.batch_size < 1 or args.group_size < 2 or args.max_length < 2:
        sys.exit("--steps, --batch-size >= 1; --group-size, --max-length >= 2")

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        folder = Path(tmp)
        labels = make_labels(folder, args.group_size, args.queries)
        # Ours at its default ("auto": AUTO_TOKENS_PER_PASS padded tokens per pass on a CPU),
        # the peer with the same number of texts per pass.
        from llm_embedder.train import AUTO_TOKENS_PER_PASS

        auto = args.micro_batch_size is None
        micro = (max(1, AUTO_TOKENS_PER_PASS // args.max_length) if auto
                 else args.micro_batch_size or None)
        config = {"tasks": {"qa": str(labels)}, "output_dir": str(folder / "ours"),
                  "max_steps": args.steps, "batch_size": args.batch_size,
                  "group_size": args.group_size, "query_max_length": args.max_length,
                  "key_max_length": args.max_length,
                  "micro_batch_size": "auto" if auto else micro,
                  "save_steps": 0, "progress_bar": False, "plot": False, "device": "cpu"}
        rows = peer_rows(config)
        spec = folder / "spec.json"
        spec.write_text(json.dumps({"config": config, "rows": rows, "folder": tmp,
                                    "batch_size": args.batch_size,
                                    "max_length": args.max_length, "micro": micro,
                                    "lr": 5e-5, "warmup_ratio": 0.1}))
        ours = run_child("ours", spec)
        peer = run_child("peer", spec)

    ours_rate = throughput(ours["step_s"], args.batch_size)
    peer_rate = throughput(peer["step_s"], args.batch_size)
    peer_name = ("CachedMNRL (mini_batch_size {})".format(micro) if micro
                 else "MultipleNegativesRankingLoss")
    ours_name = (f"llm_embedder.train (micro_batch_size auto = {micro})" if auto
                 else f"llm_embedder.train (micro_batch_size {micro})" if micro
                 else "llm_embedder.train (whole batch)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f} at the end; batch {args.batch_size}, group "
          f"{args.group_size}, max length {args.max_length}, {args.steps} steps (first not "
          f"timed)\n")
    print("| system | ex/s | s/step (timed) | peak RSS GB | wall s | last loss |")
    print("|---|---|---|---|---|---|")
    for name, res, rate in ((ours_name, ours, ours_rate), (f"sentence-transformers, {peer_name}",
                                                         peer, peer_rate)):
        timed = res["step_s"][1:] or res["step_s"]
        print(f"| {name} | {rate:.3f} | {sum(timed) / len(timed):.1f} | "
              f"{res['peak_rss_gb']:.2f} | {res['wall_s']:.0f} | {res['loss']:.4f} |")
    print()
    print(f"train: ours {ours_rate:.3f} ex/s, sentence-transformers {peer_rate:.3f} ex/s, "
          f"ratio {ours_rate / peer_rate:.2f}, peak RSS {ours['peak_rss_gb']:.2f} GB")


# ------------------------------------------------------------------------------ the children


def child_ours(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Train with llm_embedder.train; step times from its log (examples / examples_per_s)."""
    from llm_embedder.train import train

    model_dir = train(spec["config"])
    log = [json.loads(line) for line in (model_dir.parent / "log.jsonl").read_text().splitlines()]
    return {"step_s": [spec["batch_size"] / r["examples_per_s"] for r in log],
            "loss": log[-1]["loss"], "peak_rss_gb": peak_rss_gb()}


def child_peer(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Train with SentenceTransformerTrainer on our batches; step times between step ends."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss)
    from transformers import TrainerCallback

    from llm_embedder.embedder import default_model_path

    class InOrder(DefaultBatchSampler):
        """Consecutive rows as batches: the rows are already our batches in our order."""

        def __iter__(self):
            size = self.batch_size
            yield from (list(range(i, min(i + size, len(self.sampler))))
                        for i in range(0, len(self.sampler), size))

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends = [time.perf_counter()]
            self.loss = float("nan")

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])

    torch.manual_seed(0)
    model = SentenceTransformer(str(default_model_path()), device="cpu")
    model.max_seq_length = spec["max_length"]
    loss = (CachedMultipleNegativesRankingLoss(model, mini_batch_size=spec["micro"])
            if spec["micro"] else MultipleNegativesRankingLoss(model))
    timer = StepTimer()
    args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(spec["folder"]) / "peer"), per_device_train_batch_size=spec[
            "batch_size"], max_steps=spec["config"]["max_steps"], learning_rate=spec["lr"],
        warmup_ratio=spec["warmup_ratio"], weight_decay=0.01, max_grad_norm=1.0,
        save_strategy="no", report_to="none", logging_steps=1, dataloader_num_workers=0,
        use_cpu=True, seed=0, batch_sampler=InOrder, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args,
                                         train_dataset=Dataset.from_list(spec["rows"]),
                                         loss=loss, callbacks=[timer])
    trainer.train()
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    return {"step_s": steps, "loss": timer.loss, "peak_rss_gb": peak_rss_gb()}


if __name__ == "__main__":
    main()
