"""Batched greedy generation with hooks active and the KV cache.

One prefill forward over the left-padded prompts, then one forward per new token that
feeds only that token and the HF cache. Hooks therefore see the whole prompt once and
then sequences of length 1: "the last position of every forward call" (the paper's
steering/modulation position) is the last prompt token, then every generated token.

Logits processing follows HF's greedy decoding (so that with no hooks the output is
token-for-token that of ``model.generate(do_sample=False)``):

* repetition penalty p: for every token id already in the row (prompt + generated),
  logit <- logit / p if logit > 0 else logit * p;
* no-repeat n-gram n: a token that would complete an n-gram already in the row gets -inf;
* min new tokens: EOS gets -inf until that many tokens were generated.

Rows stop at EOS independently; finished rows are fed the pad token (masked out).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from .bypass import bypass_unhooked
from .grouped_attention import grouped_decoding
from .models import compute_dtype
from .progress import tqdm
from .prompts import Prompt, TokenBatch, check_context, texts_of, tokenize
from .results import Result

_PHASE_ATTR = "_emocircuits_decoding"


def is_decoding(model) -> bool:
    """True inside ``generate`` while a forward call decodes one new token from the cache."""
    return bool(getattr(model, _PHASE_ATTR, False))


@contextmanager
def _phase(model, decoding: bool):
    prev = getattr(model, _PHASE_ATTR, False)
    object.__setattr__(model, _PHASE_ATTR, decoding)
    try:
        yield
    finally:
        object.__setattr__(model, _PHASE_ATTR, prev)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. The paper's stage-03 steering setting is ``GenerationConfig.paper_steering()``."""

    max_new_tokens: int = 100
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 16
    # compute dtype while generating (e.g. "bfloat16"); None: the model's own. The model's
    # parameters are cast for the call and restored exactly (models.compute_dtype).
    dtype: str | None = None
    # run the bridge's hook-free components as the HF modules they wrap (bypass.bypass_unhooked):
    # the same tokens, less per-step overhead. Hooks must be attached before generate is called.
    bypass_unhooked: bool = True
    # decode grouped-query attention without expanding the KV cache (grouped_attention; used by
    # the HF attention modules that bypass_unhooked puts in place): the same tokens, fewer copies
    grouped_decoding: bool = True

    def __post_init__(self) -> None:
        if self.dtype is not None:
            from .models import resolve_dtype

            resolve_dtype(self.dtype)  # raises on an unknown name
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def paper_prompting(cls) -> GenerationConfig:
        return cls(max_new_tokens=100)

    @classmethod
    def paper_steering(cls) -> GenerationConfig:
        return cls(max_new_tokens=100, min_new_tokens=10, repetition_penalty=1.05,
                   no_repeat_ngram_size=3)

    @classmethod
    def paper_modulation(cls) -> GenerationConfig:
        return cls(max_new_tokens=100, min_new_tokens=10, repetition_penalty=1.1,
                   no_repeat_ngram_size=3)


@dataclass
class GenerationResult(Result):
    texts: list[str]
    tokens: list[list[int]]  # generated ids per row (EOS excluded)
    prompt_lengths: list[int]
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def _summary(self) -> dict[str, str]:
        out = {"n": str(len(self.texts)), "n_tokens": str(self.n_tokens)}
        return {**out, **super()._summary()}

    def to_dataframe(self):
        """One row per prompt: the generated ``text``, ``n_tokens`` and ``prompt_length``."""
        import pandas as pd

        return pd.DataFrame({"text": self.texts, "n_tokens": [len(t) for t in self.tokens],
                             "prompt_length": self.prompt_lengths})


def _apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, p: float) -> torch.Tensor:
    """seen: bool [b, vocab]; HF's multiplicative penalty on every seen id."""
    if p == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def _banned_ngram_tokens(rows: list[list[int]], n: int) -> list[list[int]]:
    """For each row, the tokens that would complete an n-gram already present."""
    out: list[list[int]] = []
    for ids in rows:
        if len(ids) + 1 < n:
            out.append([])
            continue
        prefix = tuple(ids[len(ids) - n + 1:]) if n > 1 else ()
        banned = [
            ids[i + n - 1]
            for i in range(len(ids) - n + 1)
            if tuple(ids[i:i + n - 1]) == prefix
        ]
        out.append(banned)
    return out


LogitsProcessor = Callable[[int, list[list[int]], torch.Tensor], torch.Tensor]
"""``(step, rows, logits[b, vocab]) -> logits``: rows are each row's ids so far (prompt +
generated); called before the built-in processors, in order, at every step. ``logits`` is the
loop's float32 working tensor, reused from step to step: a processor may change it in place
and return it, and must ``clone()`` it to keep it beyond the call."""


class _NgramBans:
    """No-repeat n-gram bans, kept incrementally: for each row, (n−1)-gram prefix -> the
    tokens that followed it. ``banned(i)`` = the tokens that would complete an n-gram already
    in row i (what ``_banned_ngram_tokens`` recomputes from scratch; equal, tested)."""

    def __init__(self, rows: list[list[int]], n: int):
        self.n = n
        self.rows = rows
        self.seen: list[dict[tuple[int, ...], set[int]]] = [{} for _ in rows]
        for i, ids in enumerate(rows):
            for j in range(len(ids) - n + 1):
                self.seen[i].setdefault(tuple(ids[j:j + n - 1]), set()).add(ids[j + n - 1])

    def add(self, i: int, token: int) -> None:
        ids = self.rows[i]  # token already appended
        if len(ids) >= self.n:
            self.seen[i].setdefault(tuple(ids[len(ids) - self.n:-1]), set()).add(token)

    def banned(self, i: int) -> list[int]:
        ids = self.rows[i]
        if len(ids) + 1 < self.n:
            return []
        return sorted(self.seen[i].get(tuple(ids[len(ids) - self.n + 1:]) if self.n > 1 else (), ()))


@torch.no_grad()
def _generate_batch(model, batch: TokenBatch, cfg: GenerationConfig, eos_ids: set[int],
                    processors: Sequence[LogitsProcessor] = ()):
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    b = batch.tokens.shape[0]
    device = batch.tokens.device
    rows = [batch.tokens[i, batch.tokens.shape[1] - int(batch.lengths[i]):].tolist() for i in range(b)]
    # the repetition penalty acts on every id seen in the row: a [b, T] id table (padding slots
    # repeat the row's first id) gathered and scattered back, as HF does, instead of a [b, vocab] mask
    penalise = cfg.repetition_penalty != 1.0
    if penalise:
        width = max(len(r) for r in rows)
        seen_ids = torch.tensor([[r[0]] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    bans = _NgramBans(rows, cfg.no_repeat_ngram_size) if cfg.no_repeat_ngram_size > 0 else None
    generated: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    done_t = torch.zeros(b, dtype=torch.bool, device=device)
    mask = batch.attention_mask
    eos_t = torch.tensor(sorted(eos_ids), device=device)
    with _phase(model, False):
        logits, cache = model(batch.tokens, attention_mask=mask, return_type="logits_and_cache",
                              use_cache=True, logits_to_keep=1)
    work = None  # the step's float32 logits, one buffer per batch (see _step_logits)
    for step in range(cfg.max_new_tokens):
        nxt_logits, work = _step_logits(logits, work)
        for proc in processors:
            nxt_logits = proc(step, rows, nxt_logits)
        if penalise:
            sc = nxt_logits.gather(1, seen_ids)
            sc = torch.where(sc > 0, sc / cfg.repetition_penalty, sc * cfg.repetition_penalty)
            nxt_logits.scatter_(1, seen_ids, sc)
        if bans is not None:
            for i in range(b):
                banned = bans.banned(i)
                if banned:
                    nxt_logits[i, banned] = -float("inf")
        if step < cfg.min_new_tokens:
            nxt_logits[:, eos_t] = -float("inf")
        nxt = nxt_logits.argmax(dim=-1)
        nxt = torch.where(done_t, torch.full_like(nxt, pad_id), nxt)
        picked = nxt.tolist()
        for i, t in enumerate(picked):
            if done[i]:
                continue
            if t in eos_ids:
                done[i] = True
            else:
                generated[i].append(t)
                rows[i].append(t)
                if bans is not None:
                    bans.add(i, t)
        if all(done) or step == cfg.max_new_tokens - 1:
            break
        done_t = torch.tensor(done, dtype=torch.bool, device=device)
        if penalise:  # finished rows repeat their first id (no effect: they are masked and padded)
            col = torch.where(done_t, seen_ids[:, 0], nxt)
            seen_ids = torch.cat([seen_ids, col.unsqueeze(1)], dim=1)
        mask = torch.cat([mask, (~done_t).long().unsqueeze(1)], dim=1)
        with _phase(model, True):
            logits, cache = model(nxt.unsqueeze(1), attention_mask=mask, past_key_values=cache,
                                  return_type="logits_and_cache", use_cache=True)
    return generated


def _step_logits(logits: torch.Tensor, work: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The last position's logits as float32 ``[b, vocab]``, written into ``work`` (allocated on
    the first step, reused after). A fresh tensor per step is slow on a CPU: with Gemma 3's
    262k vocabulary at batch 64 it is 67 MB, and allocating it page-faults every step (37 ms
    for the cast against 4 ms into a kept buffer). float32 logits are used as they are."""
    last = logits[:, -1, :]
    if last.dtype == torch.float32:
        return last, work
    if work is None or work.shape != last.shape or work.device != last.device:
        work = torch.empty(last.shape, dtype=torch.float32, device=last.device)
    return work.copy_(last), work


def _eos_ids(model) -> set[int]:
    tok = model.tokenizer
    ids = set()
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    gen_cfg = getattr(model.original_model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(x) for x in extra)
    return ids


def generate(
    model,
    prompts: Sequence[str | Prompt] | str | Prompt,
    gen_config: GenerationConfig | None = None,
    *,
    progress: bool = True,
    logits_processors: Sequence[LogitsProcessor] = (),
    config: GenerationConfig | None = None,
    **overrides,
) -> GenerationResult:
    """Greedy-generate a continuation for every prompt, with whatever hooks are active.

    ``gen_config``: the ``GenerationConfig`` (``config=`` is its deprecated name);
    ``overrides`` replace its fields (e.g. ``max_new_tokens=20``). Prompts are
    sorted by length into batches of ``gen_config.batch_size`` to limit padding; results come
    back in input order. Texts are decoded without special tokens and stripped.
    ``logits_processors`` (see ``LogitsProcessor``) adjust each step's logits, e.g. the
    emotion-vocabulary bias of ``emocircuits.control``.

    Example::

        >>> out = generate(model, test, max_new_tokens=20)          # a GenerationResult
        >>> len(out.texts) == len(test), out.to_dataframe().columns.tolist()
        (True, ['text', 'n_tokens', 'prompt_length'])
    """
    from .deprecation import renamed_keyword

    gen_config = renamed_keyword("generate", "config", "gen_config", config, gen_config, None)
    cfg = gen_config or GenerationConfig()
    if overrides:
        cfg = GenerationConfig(**{**cfg.__dict__, **overrides})
    if isinstance(prompts, (str, Prompt)):
        prompts = [prompts]
    texts = texts_of(prompts)
    eos_ids = _eos_ids(model)
    lengths = [len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    check_context(model, lengths, prompts, extra=cfg.max_new_tokens)  # before any batch is run
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out_tokens: list[list[int]] = [[] for _ in texts]
    prompt_lengths = [0] * len(texts)
    t0 = time.perf_counter()
    bar = tqdm(total=len(texts), desc="generate", disable=not progress, leave=False)
    try:
        with compute_dtype(model, cfg.dtype), (bypass_unhooked(model) if cfg.bypass_unhooked else nullcontext()), \
                (grouped_decoding(model) if cfg.grouped_decoding else nullcontext()):
            for s in range(0, len(order), cfg.batch_size):
                idx = order[s:s + cfg.batch_size]
                batch = tokenize(model, [texts[i] for i in idx])
                gen = _generate_batch(model, batch, cfg, eos_ids, logits_processors)
                for j, i in enumerate(idx):
                    out_tokens[i] = gen[j]
                    prompt_lengths[i] = int(batch.lengths[j])
                bar.update(len(idx))
    finally:
        bar.close()
    decoded = [model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out_tokens]
    return GenerationResult(decoded, out_tokens, prompt_lengths, time.perf_counter() - t0,
                            meta={"config": cfg.__dict__})
