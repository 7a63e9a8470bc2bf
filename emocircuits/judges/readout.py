"""Logit emotion readout: the next-token probability mass on each emotion's words.

For a prompt that ends where the reply starts (optionally after an assistant prefix such
as ``"I feel"``), with p = softmax(logits at the last position):

    P(e) = Σ_{t ∈ T_e} p[t],   T_e = {first token of " " + w : w ∈ words(e)}

Token sets are checked against the tokenizer: a first token shared by two emotions is
dropped from both and reported in ``EmotionTokens.shared``. The readout's label is
argmax_e P(e); ``valence_score`` = P(positive emotions) − P(negative emotions).

Only the last position is unembedded (``logits_to_keep=1``), which matters for large
vocabularies (Gemma 3: 262k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from ..emotions import NEGATIVE_EMOTIONS, POSITIVE_EMOTIONS, EmotionSet, emotion_set, valence_score
from ..prompts import Prompt, tokenize
from ..results import Result
from .base import JudgeResult


@dataclass(frozen=True)
class EmotionTokens(Result):
    """First-token ids per emotion, after removing tokens shared between emotions."""

    emotions: tuple[str, ...]
    token_ids: dict[str, tuple[int, ...]]
    words: dict[str, tuple[str, ...]]  # the word each kept token came from
    shared: dict[int, tuple[str, ...]] = field(default_factory=dict)  # token -> emotions

    def index_matrix(self, vocab: int) -> torch.Tensor:
        """[emotion, vocab] 0/1 matrix M so that P = p @ M.T."""
        m = torch.zeros(len(self.emotions), vocab)
        for i, e in enumerate(self.emotions):
            m[i, list(self.token_ids[e])] = 1.0
        return m


def emotion_tokens(model_or_tokenizer, emotions: EmotionSet | Sequence[str] | None = None) -> EmotionTokens:
    """The first token of ``" " + word`` for each emotion's words, shared ones removed."""
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    es = emotions if isinstance(emotions, EmotionSet) else emotion_set(emotions)
    first: dict[str, dict[int, str]] = {}
    for e in es.names:
        first[e] = {}
        for w in es.words[e]:
            ids = tok(" " + w, add_special_tokens=False)["input_ids"]
            if ids:
                first[e].setdefault(int(ids[0]), w)
    owners: dict[int, list[str]] = {}
    for e, d in first.items():
        for t in d:
            owners.setdefault(t, []).append(e)
    shared = {t: tuple(es_) for t, es_ in owners.items() if len(es_) > 1}
    token_ids = {e: tuple(t for t in d if t not in shared) for e, d in first.items()}
    words = {e: tuple(first[e][t] for t in token_ids[e]) for e in es.names}
    empty = [e for e in es.names if not token_ids[e]]
    if empty:
        raise ValueError(f"emotion_tokens: no unshared first token left for {empty}")
    return EmotionTokens(tuple(es.names), token_ids, words, shared)


@dataclass
class ReadoutResult(Result):
    """``mass[i, j]`` = P(emotions[j]) at prompt i; ``share`` renormalises over emotions."""

    emotions: tuple[str, ...]
    mass: Float[np.ndarray, "n emotion"]
    tokens: EmotionTokens

    @property
    def share(self) -> Float[np.ndarray, "n emotion"]:
        return self.mass / np.clip(self.mass.sum(1, keepdims=True), 1e-30, None)

    @property
    def labels(self) -> list[str]:
        return [self.emotions[j] for j in self.mass.argmax(1)]

    def valence_score(self, positive: Sequence[str] = POSITIVE_EMOTIONS,
                      negative: Sequence[str] = NEGATIVE_EMOTIONS) -> np.ndarray:
        """P(positive emotions' words) − P(negative emotions' words), per prompt
        (``emotions.valence_score`` of ``mass``)."""
        return valence_score(self.mass, self.emotions, positive=positive, negative=negative)


@torch.no_grad()
def last_token_logits(model, prompts: Sequence[str | Prompt], *, batch_size: int = 16,
                      progress: bool = False) -> torch.Tensor:
    """[n, vocab] float32 logits at each prompt's last position, batched, left-padded."""
    out = []
    texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
    for s in tqdm(range(0, len(texts), batch_size), desc="readout", disable=not progress, leave=False):
        b = tokenize(model, texts[s:s + batch_size])
        logits = model(b.tokens, attention_mask=b.attention_mask, logits_to_keep=1, use_cache=False)
        out.append(logits[:, -1, :].float().cpu())
    return torch.cat(out)


def emotion_readout(
    model,
    prompts: Sequence[str | Prompt],
    emotions: EmotionSet | Sequence[str] | None = None,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> ReadoutResult:
    """P(e) for each prompt and emotion (see the module docstring)."""
    toks = emotion_tokens(model, emotions)
    logits = last_token_logits(model, prompts, batch_size=batch_size, progress=progress)
    return readout_from_logits(logits, toks)


def readout_from_logits(logits: torch.Tensor, toks: EmotionTokens) -> ReadoutResult:
    probs = torch.softmax(logits.float(), dim=-1)
    m = toks.index_matrix(probs.shape[-1]).to(probs.device)
    return ReadoutResult(toks.emotions, (probs @ m.T).cpu().numpy(), toks)


class LogitReadout:
    """The readout as a ``Judge``: ``texts`` are prompts; the label is argmax_e P(e)."""

    name = "logit_readout"

    def __init__(self, model, emotions: EmotionSet | Sequence[str] | None = None,
                 batch_size: int = 16) -> None:
        self.model = model
        self.emotions = emotions
        self.batch_size = batch_size

    def judge(self, texts: Sequence[str], targets: Sequence[str]) -> JudgeResult:
        if len(texts) != len(targets):
            raise ValueError(f"LogitReadout.judge: {len(texts)} prompts but {len(targets)} targets")
        r = emotion_readout(self.model, texts, self.emotions, batch_size=self.batch_size)
        labels = r.labels
        return JudgeResult(r.emotions, list(labels), r.share,
                           [lab == t for lab, t in zip(labels, targets, strict=True)],
                           meta={"mass": r.mass})


def auc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """P(score of a positive item > score of a negative item), ties counted half."""
    pos = np.asarray(pos_scores, dtype=np.float64)[:, None]
    neg = np.asarray(neg_scores, dtype=np.float64)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())
