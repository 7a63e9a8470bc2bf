"""Logit emotion readout: the next-token probability mass on each emotion's words.

For a prompt that ends where the reply starts (optionally after an assistant prefix such
as ``"I feel"``), with p = softmax(logits at the last position):

    P(e) = Σ_{t ∈ T_e} p[t],   T_e = {first token of f(w) : w ∈ words(e), f ∈ (" w", "w")}

``emotion_tokens`` is the one emotion token set of the library (this readout, the logit
metrics of patching/components/circuits, and control's ``VocabularyBias`` and
``DecayingSchedule``). Token sets are checked against the tokenizer: a first token counts
only when it decodes to the whole word or to a prefix of at least ``MIN_PREFIX`` (4) letters
("s" of "sad" is not an emotion word), and a token claimed by two emotions is dropped from
both and reported in ``EmotionTokens.shared``. The readout's label is
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

from ..emotions import NEGATIVE_EMOTIONS, POSITIVE_EMOTIONS, EmotionSet, emotion_set, valence_score
from ..progress import tqdm
from ..prompts import Prompt, texts_of, tokenize
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


TOKEN_FORMS: tuple[str, ...] = (" {w}", "{w}")
"""The word forms whose first tokens make an emotion's token set (``{w}``: the word,
``{W}``: capitalised)."""
MIN_PREFIX = 4
"""A first token that is not the whole word must be a prefix of at least this many letters."""


def word_first_token(tok, form: str, word: str, min_prefix: int = MIN_PREFIX) -> int | None:
    """The first token of ``form`` applied to ``word`` when it decodes to the whole word or to a
    prefix of at least ``min_prefix`` letters (case and surrounding space ignored), else None."""
    s = form.format(w=word, W=word.capitalize())
    ids = tok(s, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    piece = tok.decode([ids[0]]).strip().lower()
    target = s.strip().lower()
    if piece == target or (len(piece) >= min_prefix and target.startswith(piece)):
        return int(ids[0])
    return None


def emotion_tokens(model_or_tokenizer, emotions: EmotionSet | Sequence[str] | None = None, *,
                   forms: Sequence[str] = TOKEN_FORMS, min_prefix: int = MIN_PREFIX) -> EmotionTokens:
    """The one emotion token set (module docstring): per emotion, the first tokens of its words
    in each of ``forms`` that pass ``word_first_token``, minus the tokens two emotions share.
    ``emotions``: an ``EmotionSet`` or names (builtin word lists; default EKMAN6)."""
    tok = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    es = emotions if isinstance(emotions, EmotionSet) else emotion_set(emotions)
    first: dict[str, dict[int, str]] = {}
    for e in es.names:
        first[e] = {}
        for w in es.words[e]:
            for f in forms:
                t = word_first_token(tok, f, w, min_prefix)
                if t is not None:
                    first[e].setdefault(t, w)
    owners: dict[int, list[str]] = {}
    for e, d in first.items():
        for t in d:
            owners.setdefault(t, []).append(e)
    shared = {t: tuple(es_) for t, es_ in owners.items() if len(es_) > 1}
    token_ids = {e: tuple(sorted(t for t in d if t not in shared)) for e, d in first.items()}
    words = {e: tuple(first[e][t] for t in token_ids[e]) for e in es.names}
    empty = [e for e in es.names if not token_ids[e]]
    if empty:
        raise ValueError(f"emotion_tokens: no usable unshared word token left for {empty} "
                         f"(forms {list(forms)}, min_prefix {min_prefix})")
    return EmotionTokens(tuple(es.names), token_ids, words, shared)


def emotion_token_ids(model_or_tokenizer, emotion: str,
                      emotions: EmotionSet | Sequence[str] | None = None, **kw) -> tuple[int, ...]:
    """The token ids of one ``emotion`` for a model: ``emotion_tokens(model, emotions)`` (the
    set its tokens must not be shared with; default EKMAN6, plus ``emotion`` when missing)."""
    if emotions is None or (not isinstance(emotions, EmotionSet) and emotion not in emotions):
        names = tuple(emotions) if emotions is not None else tuple(emotion_set().names)
        emotions = names if emotion in names else names + (emotion,)
    toks = emotion_tokens(model_or_tokenizer, emotions, **kw)
    if emotion not in toks.emotions:
        raise KeyError(f"emotion_token_ids: {emotion!r} is not in the emotion set {list(toks.emotions)}")
    return toks.token_ids[emotion]


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

    def _summary(self) -> dict[str, str]:
        return {"n": str(len(self.mass)), **super()._summary()}

    def to_dataframe(self, values: str = "mass"):
        """One row per prompt: ``label`` (argmax) and one column per emotion holding P(e)
        (``values="mass"``) or its share of the emotion-word mass (``values="share"``)."""
        import pandas as pd

        if values not in ("mass", "share"):
            raise ValueError(f"to_dataframe: values must be 'mass' or 'share', got {values!r}")
        m = np.asarray(self.mass if values == "mass" else self.share)
        df = pd.DataFrame(m, columns=list(self.emotions))
        df.insert(0, "label", self.labels)
        return df


@torch.no_grad()
def last_token_logits(model, prompts: Sequence[str | Prompt] | str | Prompt, *, batch_size: int = 16,
                      progress: bool = False) -> torch.Tensor:
    """[n, vocab] float32 logits at each prompt's last position, batched, left-padded (a bare
    string or ``Prompt`` is one prompt)."""
    out = []
    texts = texts_of(prompts)
    for s in tqdm(range(0, len(texts), batch_size), desc="readout", disable=not progress, leave=False):
        b = tokenize(model, texts[s:s + batch_size])
        logits = model(b.tokens, attention_mask=b.attention_mask, logits_to_keep=1, use_cache=False)
        out.append(logits[:, -1, :].float().cpu())
    return torch.cat(out)


def emotion_readout(
    model,
    prompts: Sequence[str | Prompt] | str | Prompt,
    emotions: EmotionSet | Sequence[str] | None = None,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> ReadoutResult:
    """P(e) for each prompt and emotion (see the module docstring); a bare string or
    ``Prompt`` is one prompt (one row).

    Example::

        >>> r = emotion_readout(model, test)             # EKMAN6 by default; prompts end in "I feel"
        >>> r.emotions[:3], r.share.shape                # share: each row sums to 1
        (('anger', 'sadness', 'happiness'), (6, 6))
        >>> r.labels[0]                                  # the most likely emotion word, prompt 0
    """
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

    def judge(self, texts: Sequence[str] | str, targets: Sequence[str] | str) -> JudgeResult:
        texts = texts_of(texts)
        targets = [targets] if isinstance(targets, str) else list(targets)
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
