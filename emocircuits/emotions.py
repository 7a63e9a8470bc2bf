"""Emotion sets, their word lists and their valence–arousal coordinates.

One place for the vocabulary every stage shares:

* ``EKMAN6``: Ekman's six basic emotions in the order the paper uses
  (anger, sadness, happiness, fear, surprise, disgust).
* ``EmotionSet``: an ordered, user-definable set of emotions, each with a word list
  (used by the logit readout, the lexicon judge and the no-emotion-word checker) and
  optional valence–arousal coordinates.
* ``VA_COORDINATES``: (valence, arousal) in [-1, 1]² for the six emotions and neutral.
  Source: Russell, J. A. & Mehrabian, A. (1977), "Evidence for a three-factor theory of
  emotions", *Journal of Research in Personality* 11(3):273–294 — pleasure and arousal
  scores of the emotion terms angry, sad, happy, fearful, surprised, disgusted from that
  study's table of 151 emotion terms (pleasure used as valence). Neutral is placed at the
  origin by definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

EKMAN6: tuple[str, ...] = ("anger", "sadness", "happiness", "fear", "surprise", "disgust")
NEUTRAL = "neutral"

# Words that name or directly express each emotion. The first tokens of the
# leading-space forms of these words feed the logit readout; the full list feeds the
# "no emotion words in the data" checker and the lexicon judge.
EMOTION_WORDS: dict[str, tuple[str, ...]] = {
    "anger": (
        "angry", "anger", "furious", "mad", "annoyed", "irritated", "outraged", "enraged",
        "livid", "frustrated", "resentful", "irate", "rage", "fuming", "infuriated", "hostile",
    ),
    "sadness": (
        "sad", "sadness", "unhappy", "heartbroken", "depressed", "miserable", "sorrowful",
        "gloomy", "downcast", "melancholy", "grief", "sorrow", "devastated", "despair",
        "crushed", "tearful",
    ),
    "happiness": (
        "happy", "happiness", "glad", "joyful", "joy", "delighted", "thrilled", "cheerful",
        "elated", "overjoyed", "ecstatic", "pleased", "excited", "grateful",
        "wonderful",
    ),
    "fear": (
        "afraid", "fear", "scared", "frightened", "terrified", "anxious", "nervous", "worried",
        "panicked", "fearful", "dread", "horrified", "alarmed", "uneasy", "apprehensive",
        "petrified",
    ),
    "surprise": (
        "surprised", "surprise", "shocked", "amazed", "astonished", "stunned", "startled",
        "astounded", "speechless", "unexpected", "wow", "dumbfounded", "flabbergasted",
        "bewildered", "incredible", "unbelievable",
    ),
    "disgust": (
        "disgusted", "disgust", "revolted", "repulsed", "sickened", "nauseated", "gross",
        "repelled", "appalled", "grossed", "revolting", "disgusting", "vile", "nasty",
        "repugnant", "loathing",
    ),
    "neutral": ("fine", "okay", "calm", "neutral", "indifferent", "alright", "normal", "ok"),
}

# (valence, arousal), Russell & Mehrabian (1977), see module docstring.
VA_COORDINATES: dict[str, tuple[float, float]] = {
    "anger": (-0.51, 0.59),
    "sadness": (-0.63, -0.27),
    "happiness": (0.81, 0.51),
    "fear": (-0.64, 0.60),
    "surprise": (0.40, 0.67),
    "disgust": (-0.60, 0.35),
    "neutral": (0.0, 0.0),
}
VA_SOURCE = (
    "Russell & Mehrabian (1977), J. Research in Personality 11(3):273-294, pleasure/arousal "
    "of the terms angry, sad, happy, fearful, surprised, disgusted; neutral at the origin."
)

POSITIVE_EMOTIONS: tuple[str, ...] = ("happiness",)
NEGATIVE_EMOTIONS: tuple[str, ...] = ("anger", "sadness", "fear", "disgust")


def valence_score(
    probs,
    emotions: Sequence[str],
    *,
    positive: Sequence[str] = POSITIVE_EMOTIONS,
    negative: Sequence[str] = NEGATIVE_EMOTIONS,
) -> np.ndarray:
    """P(positive emotions) − P(negative emotions) per row of ``probs`` ``[n, emotion]``
    (columns in ``emotions`` order; emotions of ``positive``/``negative`` that are not columns
    are skipped, so surprise and neutral count on neither side by default).

    The one valence helper behind ``ReadoutResult.valence_score``, ``MalleabilityResult.valence``
    and ``probes.valence_of``."""
    p = np.asarray(probs)
    names = list(emotions)
    if p.ndim != 2 or p.shape[1] != len(names):
        raise ValueError(f"valence_score: probs must be [n, {len(names)}] for emotions {names}, "
                         f"got shape {p.shape}")
    pos = [names.index(e) for e in positive if e in names]
    neg = [names.index(e) for e in negative if e in names]
    return p[:, pos].sum(1) - p[:, neg].sum(1)


@dataclass(frozen=True)
class EmotionSet:
    """An ordered set of emotions with word lists and optional (valence, arousal)."""

    names: tuple[str, ...]
    words: dict[str, tuple[str, ...]] = field(default_factory=dict)
    va: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"EmotionSet: duplicate emotion names in {self.names}")
        if not self.names:
            raise ValueError("EmotionSet: needs at least one emotion")
        missing = [n for n in self.names if not self.words.get(n)]
        if missing:
            raise ValueError(
                f"EmotionSet: no word list for {missing}; pass words={{name: (word, ...)}}"
            )

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown emotion {name!r}; this set has {list(self.names)}") from None


def emotion_set(
    names: tuple[str, ...] | list[str] | None = None,
    *,
    include_neutral: bool = False,
    words: dict[str, tuple[str, ...] | list[str]] | None = None,
    va: dict[str, tuple[float, float]] | None = None,
) -> EmotionSet:
    """Build an ``EmotionSet``; defaults to EKMAN6 with the builtin word lists and VA."""
    names = tuple(names) if names is not None else EKMAN6
    if include_neutral and NEUTRAL not in names:
        names = names + (NEUTRAL,)
    w = {n: EMOTION_WORDS[n] for n in names if n in EMOTION_WORDS}
    w.update({k: tuple(v) for k, v in (words or {}).items()})
    coords = {n: VA_COORDINATES[n] for n in names if n in VA_COORDINATES}
    coords.update(va or {})
    return EmotionSet(names=names, words=w, va=coords)


def all_emotion_words() -> set[str]:
    """Every builtin emotion word except the neutral list (lower case)."""
    return {w for e, ws in EMOTION_WORDS.items() if e != NEUTRAL for w in ws}
