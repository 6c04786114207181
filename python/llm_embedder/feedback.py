"""LLM feedback (DESIGN.md §2-3): a frozen LLM scores retrieval candidates, and ``label`` writes
the rewards the embedder is trained from.

For each query the candidates are its positives, negatives mined from its candidate pool (BM25
and/or the current embedder) and the empty context. The LLM samples N outputs without context;
the desired output and every sample are then scored under every candidate by teacher forcing
(token-mean log-likelihood of the output tokens only). Each candidate prompt is run once and its
KV cache is shared by all the outputs scored under it, which is what makes labelling affordable
on a CPU (``benches/bench_label.py``). The likelihood reward is the desired output's score; the
rank-aware reward comes from the native kernel.

Example:
    >>> from llm_embedder import label
    >>> summary = label("qa", "queries.train.jsonl", "corpus.jsonl", "labels/qa.jsonl",
    ...                 num_samples=8, num_negatives=7)
    >>> print(summary)
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .data import (
    DataError,
    JsonlAppender,
    LabelledQuery,
    Passage,
    Query,
    atomic_write_text,
    candidate_pool,
    iter_jsonl,
    load_corpus,
    load_queries,
    parse_labelled,
)
from .tasks import Task, get_task

PathLike = Union[str, "os.PathLike[str]"]

#: Sampling budget per task, in new tokens: answers are short (spans, labels, one API call).
DEFAULT_MAX_NEW_TOKENS = {"qa": 24, "convsearch": 24, "chat": 32, "icl": 8, "tool": 48,
                          "lrlm": 64}
#: A prompt joins a batch only if at least this fraction of the batch's width is its own.
PAD_TOLERANCE = 0.85
#: Tasks whose outputs may span lines; all others stop sampling at the first newline.
MULTILINE_TASKS = frozenset({"lrlm"})

_LLM_CACHE: Dict[Tuple[str, str, str], "FrozenLLM"] = {}


# ============================================================================ the frozen LLM

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


def _mix_seed(*parts: Any) -> int:
    """A seed from its parts that is the same in every process (unlike ``hash``)."""
    return zlib.crc32(":".join(str(p) for p in parts).encode("utf-8")) & 0x7FFFFFFF


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


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
             dtype: Any = None) -> "FrozenLLM":
        """Load (once per process) a frozen causal LM.

        ``path_or_id``: None for the packaged SmolLM2-135M-Instruct (its GGUF is dequantised once
        per machine and cached, see :mod:`llm_embedder.models`); a local Hugging Face causal-LM
        folder; a ``.gguf`` file (or a folder holding one); or a hub id when online. Device:
        CUDA when available; dtype: bfloat16 on GPU, float32 on CPU.

        Example:
            >>> llm = FrozenLLM.load("path/to/Qwen2.5-0.5B-Instruct", device="cuda")
        """
        from .models import default_llm_path, dequantized_llm_dir

        dev = _resolve_device(device)
        dt = _resolve_dtype(dtype, dev)
        if path_or_id is None:
            gguf = default_llm_path()
            folder, name, hub = dequantized_llm_dir(gguf), gguf.stem, False
        else:
            raw = os.fspath(path_or_id)
            path = Path(raw).expanduser()
            if path.is_file():
                if path.suffix.lower() != ".gguf":
                    raise ValueError(f"{path}: a model file must be a .gguf; otherwise pass the "
                                     f"Hugging Face model folder")
                folder, name, hub = dequantized_llm_dir(path), path.stem, False
            elif path.is_dir():
                if (path / "config.json").is_file():
                    folder, name, hub = path.resolve(), path.resolve().name, False
                else:
                    ggufs = sorted(path.glob("*.gguf"))
                    if len(ggufs) != 1:
                        raise FileNotFoundError(
                            f"{path}: not a model folder (no config.json) and holds "
                            f"{len(ggufs)} .gguf files (need exactly one)")
                    folder, name, hub = dequantized_llm_dir(ggufs[0]), ggufs[0].stem, False
            elif raw.startswith((".", "/", "~")) or raw.count("/") > 1 or (
                    os.sep != "/" and os.sep in raw):
                raise FileNotFoundError(f"LLM path not found: {raw}")
            else:
                folder, name, hub = raw, raw, True
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

        from .models import dtype_kwarg

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
                                      float(top_p), _mix_seed(seed, k))
            unique: Dict[str, str] = {}
            for text in self._decode(rows, stop_ids, stop_at_newline):
                if text and _normalise(text) not in unique:
                    unique[_normalise(text)] = text
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


# ============================================================================ labelling

@dataclass
class LabelSummary:
    """What a :func:`label` run produced (over every query of its shard found in ``out``)."""

    task: str
    out: str
    method: str
    llm: str
    queries: int  # labelled queries of this shard now in the file
    labelled_now: int  # of which labelled by this run
    skipped_existing: int  # already in the file when the run started
    skipped_no_positive: int  # labels mode: queries without positives cannot be labelled
    candidates_per_query: float
    samples_per_query: float
    mean_rank_reward: float
    mean_likelihood_reward: float
    top_positive_share: Optional[float]  # queries whose positive gets the top rank reward
    seconds: float  # wall time of the run, loading included
    setup_seconds: float  # reading data, loading the LLM/embedder (rates below exclude it)
    queries_per_s: float
    tokens_per_s: float  # LLM tokens run (prompts, outputs, sampled) per second of labelling
    pairs_per_s: float  # (candidate, output) pairs scored per second of labelling

    def __str__(self) -> str:
        share = "n/a" if self.top_positive_share is None else f"{self.top_positive_share:.3f}"
        skipped = (f", {self.skipped_no_positive} without positives skipped"
                   if self.skipped_no_positive else "")
        lines = [
            f"label {self.task} ({self.method}, llm={self.llm}) -> {self.out}",
            (f"  queries            {self.queries} ({self.labelled_now} new, "
             f"{self.skipped_existing} already there{skipped})"),
            f"  candidates/query   {self.candidates_per_query:.2f}",
        ]
        if self.method == "llm":
            lines += [f"  samples/query      {self.samples_per_query:.2f}",
                      f"  mean rank reward   {self.mean_rank_reward:.4f}",
                      f"  mean likelihood    {self.mean_likelihood_reward:.4f}"]
        lines += [
            f"  positive on top    {share}",
            f"  time               {self.seconds:.1f} s, of which setup {self.setup_seconds:.1f} s",
        ]
        if self.method == "llm":
            lines.append(f"  throughput         {self.queries_per_s:.3f} queries/s, "
                         f"{self.tokens_per_s:.0f} LLM tokens/s, {self.pairs_per_s:.1f} pairs/s")
        else:
            lines.append(f"  throughput         {self.queries_per_s:.1f} queries/s")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# Shorter answers ("yes", "2") occur in unrelated texts: no evidence of a false negative.
MIN_ANSWER_CHARS = 4


class _NegativeMiner:
    """Ranks a query's candidate pool by BM25 and/or the embedder; one BM25 index per pool."""

    def __init__(self, task: Task, corpus: Sequence[Passage], strategy: str, embedder: Any):
        self.task = task
        self.corpus = corpus
        self.strategy = strategy
        self.embedder = embedder
        self.texts = [p.full_text for p in corpus]
        self._bm25: Dict[Tuple[int, ...], Any] = {}
        self._keys: Optional[np.ndarray] = None

    def _bm25_rank(self, query: Query, pool: List[int], depth: int) -> List[int]:
        from .bm25 import BM25Index

        key = tuple(pool)
        if key not in self._bm25:
            self._bm25[key] = BM25Index([self.texts[i] for i in pool])
        local, _ = self._bm25[key].search(query.text, k=depth)
        return [pool[i] for i in local]

    def _dense_rank(self, query: Query, pool: List[int], depth: int) -> List[int]:
        if self._keys is None:
            self._keys = np.asarray(self.embedder.encode_keys(
                self.texts, task=self.task.name, show_progress_bar=False), dtype=np.float32)
        q = np.asarray(self.embedder.encode_queries(
            [query.text], task=self.task.name, show_progress_bar=False), dtype=np.float32)[0]
        scores = self._keys[pool] @ q
        order = np.lexsort((np.arange(len(pool)), -scores))[:depth]
        return [pool[i] for i in order]

    def mine(self, query: Query, k: int, exclude: Iterable[int],
             skip_answers: bool = False) -> List[int]:
        """Top ``k`` pool entries for ``query`` not in ``exclude`` (BM25/dense interleaved for
        ``both``). Entries that contain the query itself (an in-context demo of this very
        example) are skipped: they would leak the answer. ``skip_answers`` also skips entries
        that contain one of the query's answers (at least :data:`MIN_ANSWER_CHARS` characters):
        without an LLM to judge them they are likely unlabelled positives, not negatives."""
        if k <= 0:
            return []
        pool = candidate_pool(query, self.corpus)
        banned = set(exclude)
        q_norm = _normalise(query.text)
        answers = [a for a in (_normalise(a) for a in query.answers)
                   if len(a) >= MIN_ANSWER_CHARS] if skip_answers else []
        depth = min(len(pool), k + len(banned) + (48 if answers else 16))
        if depth == 0:
            return []
        rankings = []
        if self.strategy in ("bm25", "both"):
            rankings.append(self._bm25_rank(query, pool, depth))
        if self.strategy in ("embedder", "both"):
            rankings.append(self._dense_rank(query, pool, depth))
        chosen: List[int] = []
        for position in range(depth):
            for ranking in rankings:
                if position < len(ranking):
                    i = ranking[position]
                    if i in banned or i in chosen:
                        continue
                    text = _normalise(self.texts[i])
                    if len(q_norm) >= 10 and text.startswith(q_norm):
                        continue
                    if any(a in text for a in answers):
                        continue
                    chosen.append(i)
                    if len(chosen) == k:
                        return chosen
        return chosen


def _load_inputs(queries: Any, corpus: Any, require_answers: bool
                 ) -> Tuple[List[Query], List[Passage], str, str]:
    if isinstance(queries, (str, os.PathLike)):
        q_name = os.fspath(queries)
        queries = load_queries(queries, require_answers=require_answers)
    else:
        q_name = "<queries>"
        queries = list(queries)
        for q in queries:
            if not isinstance(q, Query):
                raise TypeError(f"queries must be a path or a list of Query, got "
                                f"{type(q).__name__}")
            if require_answers and not any(a.strip() for a in q.answers):
                raise DataError(q_name, None, f"query {q.id!r}: field 'answers' is empty: the "
                                              f"LLM needs a desired output")
    if isinstance(corpus, (str, os.PathLike)):
        c_name = os.fspath(corpus)
        corpus = load_corpus(corpus)
    else:
        c_name = "<corpus>"
        corpus = list(corpus)
        if not corpus:
            raise DataError(c_name, None, "corpus is empty")
    return queries, corpus, q_name, c_name


def _existing(out: Path, task: str) -> Dict[str, Tuple[int, Dict[str, Any]]]:
    """``(line, record)`` already in ``out`` by query id (a partial last line is cut first)."""
    done: Dict[str, Tuple[int, Dict[str, Any]]] = {}
    if not out.is_file():
        return done
    # A partial last line was cut by JsonlAppender; damage anywhere else is an error here.
    for number, obj in iter_jsonl(out):
        record = parse_labelled(obj, out, number)
        if record.task != task:
            raise DataError(out, number, f"field 'task' is {record.task!r} but this run "
                                         f"labels {task!r}: use another output file")
        done[record.query_id] = (number, obj)
    return done


def _round(values: Iterable[float]) -> List[float]:
    return [round(float(v), 6) for v in values]


def label(task: Union[str, Task], queries: Any, corpus: Any, out: PathLike, *,
          llm: Any = None, embedder: Any = None, method: str = "llm", num_samples: int = 8,
          num_negatives: int = 7, negatives: str = "bm25", limit: Optional[int] = None,
          shard: int = 0, num_shards: int = 1, max_key_tokens: int = 192,
          max_prompt_tokens: int = 512, max_output_tokens: int = 64,
          max_new_tokens: Optional[int] = None, temperature: float = 1.0, top_p: float = 0.95,
          max_batch_tokens: Optional[int] = None, seed: int = 0, device: Any = None,
          skip_answer_negatives: bool = True, show_progress: bool = True) -> LabelSummary:
    """Label ``queries`` with LLM rewards (DESIGN.md §3) and append them to ``out`` (JSONL).

    Candidates per query: its positives, ``num_negatives`` entries mined from its candidate pool
    (``negatives``: ``bm25``, ``embedder`` or ``both``; a query's ``group``/sub-task restricts
    the pool) and the empty context (id ``""``, always last). ``method="llm"`` samples
    ``num_samples`` outputs and scores the desired output (the first answer) and the samples
    under every candidate: ``likelihood_rewards`` = ℓ_c(o*), ``rank_rewards`` = the rank-aware
    reward, plus ``rank_rewards_shift`` (minus the empty context's) and the raw
    ``sample_likelihoods``. ``method="labels"`` uses no LLM: 1.0 for positives, 0.0 otherwise; there, with
    ``skip_answer_negatives``, mined entries that contain one of the query's answers are passed
    over (DPR's filter: such a passage is more likely an unlabelled positive than a negative; on
    the bundled knowledge slice 2 % of BM25 negatives, touching 13 % of the queries).

    Budgets are in tokens of the LLM: candidate texts are cut to ``max_key_tokens`` in the
    prompt (the file keeps the full text), prompts to their last ``max_prompt_tokens``, scored
    outputs to ``max_output_tokens``; samples get ``max_new_tokens`` new tokens (default: twice
    the desired output's length + 4, at most :data:`DEFAULT_MAX_NEW_TOKENS` of the task).
    ``max_batch_tokens`` bounds the tokens per forward pass (default: the LLM's).

    Resumable: queries already in ``out`` are skipped, each query is appended (flushed, fsynced)
    as soon as it is done, and a partial last line left by a kill is cut off on the next run.
    ``limit`` keeps the first ``limit`` queries; shard ``i`` of ``S`` then takes every S-th from
    the i-th (merge the shard files with :func:`merge_labelled`).

    Example:
        >>> label("qa", "qa/queries.train.jsonl", "qa/corpus.jsonl", "qa.labels.jsonl",
        ...       num_samples=8, limit=100)
    """
    start = time.perf_counter()
    task = task if isinstance(task, Task) else get_task(task)
    if method not in ("llm", "labels"):
        raise ValueError(f"method must be 'llm' or 'labels', got {method!r}")
    if negatives not in ("bm25", "embedder", "both"):
        raise ValueError(f"negatives must be 'bm25', 'embedder' or 'both', got {negatives!r}")
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"need 0 <= shard < num_shards, got shard={shard}, "
                         f"num_shards={num_shards}")
    if method == "llm" and num_samples < 1:
        raise ValueError("num_samples must be >= 1 for the rank-aware reward")
    if num_negatives < 0 or (limit is not None and limit < 0):
        raise ValueError("num_negatives and limit must be >= 0")
    queries, corpus, q_name, c_name = _load_inputs(queries, corpus, method == "llm")
    selected = queries[:limit] if limit is not None else queries
    mine = selected[shard::num_shards]

    out = Path(out)
    appender = JsonlAppender(out)  # cuts a partial last line before we read the file
    try:
        existing = _existing(out, task.name)
        todo = [q for q in mine if q.id not in existing]
        by_id = {p.id: i for i, p in enumerate(corpus)}
        for q in todo:
            for pid in q.positive_ids:
                if pid not in by_id:
                    raise DataError(q_name, None, f"query {q.id!r}: positive id {pid!r} is not "
                                                  f"in the corpus {c_name}")
        if negatives != "bm25" and embedder is None and todo:
            from .embedder import Embedder

            embedder = Embedder.from_pretrained(device=device)
        miner = _NegativeMiner(task, corpus, negatives, embedder)
        frozen: Optional[FrozenLLM] = None
        if method == "llm" and todo:
            frozen = llm if isinstance(llm, FrozenLLM) else FrozenLLM.load(llm, device=device)
        llm_name = "labels" if method == "labels" else (
            frozen.name if frozen is not None else (llm.name if isinstance(llm, FrozenLLM)
                                                    else str(llm or "default")))
        for number, obj in existing.values():
            if todo and obj.get("llm") and obj["llm"] != llm_name:
                raise DataError(out, number, f"labelled by {obj['llm']!r}, but this run uses "
                                             f"{llm_name!r}: use another output file")
        stats0 = dict(frozen.stats) if frozen is not None else {}
        skipped_no_positive = 0
        setup = time.perf_counter() - start
        bar = _progress(len(todo), f"label {task.name}", show_progress)
        labelled_now = 0
        try:
            for q in todo:
                positives = list(dict.fromkeys(by_id[p] for p in q.positive_ids))
                if method == "labels" and not positives:
                    skipped_no_positive += 1
                    bar.update(1)
                    continue
                mined = miner.mine(q, num_negatives, positives,
                                   skip_answers=method == "labels" and skip_answer_negatives)
                idx = positives + mined
                candidates = [{"id": corpus[i].id, "text": corpus[i].full_text} for i in idx]
                candidates.append({"id": "", "text": ""})
                if method == "labels":
                    record = _label_by_hand(task, q, candidates, len(positives))
                else:
                    record = _label_with_llm(frozen, task, q, candidates, num_samples,
                                             max_key_tokens, max_prompt_tokens, max_output_tokens,
                                             max_new_tokens, temperature, top_p, max_batch_tokens,
                                             seed)
                appender.append(record.to_json())
                labelled_now += 1
                bar.update(1)
                if frozen is not None:
                    spent = time.perf_counter() - start - setup
                    tokens = frozen.stats["forward_tokens"] - stats0["forward_tokens"]
                    bar.set_postfix_str(f"{tokens / max(spent, 1e-9):.0f} tok/s", refresh=False)
        finally:
            bar.close()
    finally:
        appender.close()

    seconds = time.perf_counter() - start
    summary = _summarise(out, task.name, method, llm_name, {q.id for q in mine}, labelled_now,
                         len(mine) - len(todo), skipped_no_positive, seconds, setup,
                         frozen.stats if frozen is not None else {}, stats0)
    if show_progress:
        print(summary, file=sys.stderr)
    return summary


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)


def _label_by_hand(task: Task, q: Query, candidates: List[Dict[str, str]],
                   n_pos: int) -> LabelledQuery:
    rewards = [1.0 if k < n_pos else 0.0 for k in range(len(candidates))]
    return LabelledQuery(
        query_id=q.id, task=task.name, query=q.text,
        answer=next((a for a in q.answers if a.strip()), ""), candidates=candidates,
        likelihood_rewards=list(rewards), rank_rewards=list(rewards), samples=[],
        positive_ids=[c["id"] for c in candidates[:n_pos]], llm="labels",
        extra={"rank_rewards_shift": list(rewards), "method": "labels"})


def _label_with_llm(llm: FrozenLLM, task: Task, q: Query, candidates: List[Dict[str, str]],
                    num_samples: int, max_key_tokens: int, max_prompt_tokens: int,
                    max_output_tokens: int, max_new_tokens: Optional[int], temperature: float,
                    top_p: float, max_batch_tokens: Optional[int], seed: int) -> LabelledQuery:
    from . import _native

    answer = next(a for a in q.answers if a.strip()).strip()
    empty_prompt = task.format_prompt(q.text, None)
    multiline = task.name in MULTILINE_TASKS
    if max_new_tokens is None:
        # Samples much longer than the desired output only cost time: they are rivals to it.
        answer_tokens = len(llm.tokenizer(task.answer_prefix + answer,
                                          add_special_tokens=False)["input_ids"])
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS.get(task.name, 32),
                             max(8, 2 * answer_tokens + 4))
    # The seed depends on the query id only: a resumed or sharded run draws the same samples.
    drawn = llm.sample([empty_prompt], num_samples, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, seed=_mix_seed(seed, q.id),
                       stop_at_newline=not multiline, max_prompt_tokens=max_prompt_tokens)[0]
    samples = [s for s in drawn if _normalise(s) != _normalise(answer)]
    keys = llm.truncate([c["text"] for c in candidates[:-1]], max_key_tokens)
    prompts = [task.format_prompt(q.text, k) for k in keys] + [empty_prompt]
    outputs = [task.answer_prefix + o for o in [answer, *samples]]
    scores = llm.score_grouped(prompts, [outputs] * len(prompts),
                               max_prompt_tokens=max_prompt_tokens,
                               max_output_tokens=max_output_tokens,
                               max_batch_tokens=max_batch_tokens)
    table = np.stack(scores).astype(np.float32)  # [M, 1 + N]
    if not np.all(np.isfinite(table)):
        raise FloatingPointError(f"query {q.id!r}: non-finite log-likelihood from the LLM")
    target = np.ascontiguousarray(table[None, :, 0])
    sampled = np.ascontiguousarray(table[None, :, 1:])
    rank = _native.rank_aware_reward(target, sampled, "position")[0]
    shift = rank - rank[-1]
    positive_ids = [c["id"] for c in candidates if c["id"] in set(q.positive_ids)]
    return LabelledQuery(
        query_id=q.id, task=task.name, query=q.text, answer=answer, candidates=candidates,
        likelihood_rewards=_round(table[:, 0]), rank_rewards=_round(rank), samples=samples,
        positive_ids=positive_ids, llm=llm.name,
        extra={"rank_rewards_shift": _round(shift),
               "sample_likelihoods": [_round(row) for row in table[:, 1:]],
               "method": "llm"})


def _summarise(out: Path, task: str, method: str, llm_name: str, ids: set, labelled_now: int,
               skipped_existing: int, skipped_no_positive: int, seconds: float, setup: float,
               stats: Dict[str, int], stats0: Dict[str, int]) -> LabelSummary:
    n = 0
    candidates = samples = 0
    rank_sum = ll_sum = 0.0
    rank_count = 0
    with_pos = top = 0
    if out.is_file():
        with out.open("r", encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                obj = json.loads(line)
                if obj.get("query_id") not in ids:
                    continue
                n += 1
                cands = obj["candidates"]
                rr = obj["rank_rewards"]
                candidates += len(cands)
                samples += len(obj.get("samples", []))
                rank_sum += sum(rr)
                ll_sum += sum(obj["likelihood_rewards"])
                rank_count += len(rr)
                pos = set(obj.get("positive_ids", []))
                pos_r = [r for c, r in zip(cands, rr) if c["id"] in pos]
                if pos_r:
                    with_pos += 1
                    others = [r for c, r in zip(cands, rr) if c["id"] not in pos]
                    top += int(not others or max(pos_r) >= max(others))
    work = seconds - setup
    tokens = stats.get("forward_tokens", 0) - stats0.get("forward_tokens", 0)
    pairs = stats.get("pairs_scored", 0) - stats0.get("pairs_scored", 0)
    return LabelSummary(
        task=task, out=str(out), method=method, llm=llm_name, queries=n,
        labelled_now=labelled_now, skipped_existing=skipped_existing,
        skipped_no_positive=skipped_no_positive,
        candidates_per_query=candidates / n if n else 0.0,
        samples_per_query=samples / n if n else 0.0,
        mean_rank_reward=rank_sum / rank_count if rank_count else math.nan,
        mean_likelihood_reward=ll_sum / rank_count if rank_count else math.nan,
        top_positive_share=top / with_pos if with_pos else None,
        seconds=seconds, setup_seconds=setup,
        queries_per_s=labelled_now / work if work > 0 else 0.0,
        tokens_per_s=tokens / work if work > 0 else 0.0,
        pairs_per_s=pairs / work if work > 0 else 0.0)


def merge_labelled(shard_files: Sequence[PathLike], out: PathLike) -> int:
    """Merge labelled shard files into ``out`` (written atomically); returns the record count.

    Records are interleaved round-robin (shard 0's first, shard 1's first, ...), which restores
    the original query order of a ``shard``/``num_shards`` split, so the merge of complete
    shards equals the unsharded file byte for byte. A partial last line (a killed shard) is
    left out; a query id found twice with different content is an error.

    Example:
        >>> merge_labelled(["qa.0.jsonl", "qa.1.jsonl"], "qa.jsonl")
    """
    if not shard_files:
        raise ValueError("no shard files to merge")
    per_shard: List[List[Tuple[str, str]]] = []
    for path in shard_files:
        path = Path(path)
        if not path.is_file():
            raise DataError(path, None, "shard file not found")
        raw = path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        if len(complete) != len(raw):
            print(f"warning: {path}: partial last line (killed run?) left out of the merge",
                  file=sys.stderr)
        lines = []
        for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(path, number, f"invalid JSON ({err.msg})") from err
            record = parse_labelled(obj, path, number)
            lines.append((record.query_id, line))
        per_shard.append(lines)
    seen: Dict[str, str] = {}
    merged: List[str] = []
    for position in range(max(len(s) for s in per_shard)):
        for shard_lines in per_shard:
            if position < len(shard_lines):
                qid, line = shard_lines[position]
                if qid in seen:
                    if seen[qid] != line:
                        raise DataError(out, None, f"query {qid!r} is labelled differently in "
                                                   f"two shard files")
                    continue
                seen[qid] = line
                merged.append(line)
    atomic_write_text(out, "".join(line + "\n" for line in merged))
    return len(merged)


__all__ = ["DEFAULT_MAX_NEW_TOKENS", "FrozenLLM", "LabelSummary", "label", "merge_labelled"]
