"""kill -9 at random points: nothing already written is lost, nothing half-written is left.

Each test runs the real command in a child process, kills it with SIGKILL at seeded random
moments, runs it again until it finishes, and compares the result with an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import numpy as np
import pytest
from llm_embedder.data import bundled_task_files

TOOL = bundled_task_files("tool")
KILLS = 4


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _run_with_kills(argv: List[str], cwd: Path, delays: List[float]) -> None:
    """Start ``argv`` once per delay and SIGKILL it after that many seconds (if still alive),
    then run it to completion; the last run must succeed."""
    for delay in delays:
        child = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            child.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
    done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def _leftovers(folder: Path) -> List[str]:
    """Temporaries of our own naming (``.<name>.<pid>.<hex>.tmp|.old``) anywhere below."""
    return [str(p) for p in folder.rglob(".*") if ".tmp" in p.name or p.name.endswith(".old")]


def test_killed_labelling_resumes_to_the_uninterrupted_file(tmp_path):
    def command(out: Path) -> List[str]:
        return [sys.executable, "-m", "llm_embedder.cli", "label", "--task", "tool",
                "--method", "labels", "--queries", str(TOOL["train"]), "--corpus",
                str(TOOL["corpus"]), "--out", str(out)]

    reference = tmp_path / "reference.jsonl"
    subprocess.run(command(reference), check=True, env=_env(), capture_output=True)
    rng = random.Random(0)
    killed = tmp_path / "killed.jsonl"
    _run_with_kills(command(killed), tmp_path, [rng.uniform(0.5, 4.0) for _ in range(KILLS)])
    assert killed.read_bytes() == reference.read_bytes()
    assert not _leftovers(tmp_path)


_SAVER = textwrap.dedent("""
    import sys
    import numpy as np
    from llm_embedder import Index
    path, rounds = sys.argv[1], int(sys.argv[2])
    for version in range(rounds):
        index = Index(64)
        index.add(np.full((20000, 64), version + 1, dtype=np.float32),
                  [f"id-{i}" for i in range(20000)])
        index.save(path)
""")


def test_killed_index_saves_leave_one_complete_index_and_no_temporaries(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    target = tmp_path / "index"
    rng = random.Random(1)
    _run_with_kills([sys.executable, str(script), str(target), "30"], tmp_path,
                    [rng.uniform(1.0, 4.0) for _ in range(KILLS)])
    from llm_embedder import Index

    index = Index.load(target)
    vectors = np.asarray(index.search(np.ones((1, 64), np.float32), k=1).scores)
    assert len(index) == 20000 and np.isfinite(vectors).all()
    assert not _leftovers(tmp_path), "a later save must remove what killed saves left"


@pytest.mark.slow
def test_killed_training_resumes_to_the_uninterrupted_weights(tmp_path):
    labels = tmp_path / "tool.jsonl"
    subprocess.run([sys.executable, "-m", "llm_embedder.cli", "label", "--task", "tool",
                    "--method", "labels", "--queries", str(TOOL["train"]), "--corpus",
                    str(TOOL["corpus"]), "--out", str(labels), "--limit", "24",
                    "--num-negatives", "3"], check=True, env=_env(), capture_output=True)

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(textwrap.dedent(f"""
            tasks: {{tool: {labels}}}
            output_dir: {tmp_path / name}
            max_steps: 6
            batch_size: 4
            group_size: 2
            query_max_length: 32
            key_max_length: 64
            save_steps: 1
            resume: true
            plot: false
            progress_bar: false
        """))
        return path

    subprocess.run([sys.executable, "-m", "llm_embedder.cli", "train", str(config("ref"))],
                   check=True, env=_env(), capture_output=True)
    rng = random.Random(2)
    _run_with_kills([sys.executable, "-m", "llm_embedder.cli", "train", str(config("run"))],
                    tmp_path, [rng.uniform(4.0, 12.0) for _ in range(KILLS)])
    from safetensors.numpy import load_file

    ref = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    got = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_array_equal(ref[name], got[name], err_msg=name)
    assert not _leftovers(tmp_path)
