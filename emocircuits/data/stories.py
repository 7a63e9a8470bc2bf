"""Implicit-emotion stories: the emotion is shown, never named.

Each story is a short text (2–5 sentences) in which one character feels one emotion that is
conveyed only by the situation, bodily reactions, thoughts and actions; no word of any
emotion's word list (or an inflection of it) appears. Averaging a model's residual activations
over such stories gives emotion directions that never read the emotion word (the approach of
Sofroniew et al. 2026, "Emotion Concepts and their Function in a Large Language Model").
Neutral texts (``emotion == "neutral"``) describe routine facts over the same topics.

On disk, one JSON object per line::

    {"id": "anger_000", "emotion": "anger", "person": "first", "topic": "work", "text": "..."}

The builtin corpus ``emocircuits/data/builtin/stories.jsonl`` was written for this project.

* :func:`load_stories` reads it (or any file of the same format) and reports every bad row
  with its file, line and field.
* :func:`story_splits` splits by topic into train/validation/test (all of a topic's stories go
  to one split) so that every emotion is present in every split.
* :data:`STORY_EMOTIONS` is the ordered set of 20 concepts; :data:`STORY_EMOTION_WORDS` their
  word lists (``EMOTION_WORDS`` of :mod:`emocircuits.emotions` for the six Ekman emotions).
* :func:`find_emotion_words` / :func:`check_stories` look for those words and their inflections
  (:func:`inflections`); the builtin corpus passes its own checker.
* :data:`HUMAN_VA` holds human valence/arousal ratings of every concept (Warriner, Kuperman &
  Brysbaert 2013), see :data:`HUMAN_VA_SOURCE`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from emocircuits.data.sev import EXTRA_BANNED_WORDS, DataProblem
from emocircuits.emotions import EKMAN6, EMOTION_WORDS, NEUTRAL

__all__ = [
    "BUILTIN_FILE",
    "EXTENDED_EMOTIONS",
    "EXTENDED_EMOTION_WORDS",
    "GENERAL_AFFECT_WORDS",
    "HUMAN_VA",
    "HUMAN_VA_LEMMAS",
    "HUMAN_VA_SCALE",
    "HUMAN_VA_SOURCE",
    "PERSONS",
    "REQUIRED_FIELDS",
    "SPLITS",
    "STORY_EMOTIONS",
    "STORY_EMOTION_WORDS",
    "Story",
    "StoryFormatError",
    "StoryProblem",
    "check_stories",
    "emotion_word_forms",
    "find_emotion_words",
    "human_va_unit",
    "inflections",
    "load_stories",
    "parse_stories",
    "story_splits",
    "topic_splits",
]

BUILTIN_FILE = "stories.jsonl"
REQUIRED_FIELDS: tuple[str, ...] = ("id", "emotion", "person", "topic", "text")
PERSONS: tuple[str, ...] = ("first", "third")
SPLITS: tuple[str, ...] = ("train", "validation", "test")

# Concepts beyond Ekman's six, chosen to cover the valence–arousal plane and to have human
# ratings of the concept word itself in Warriner et al. (2013).
EXTENDED_EMOTIONS: tuple[str, ...] = (
    "calm", "contentment", "relief", "gratitude", "love", "pride", "hope", "amusement",
    "excitement", "boredom", "loneliness", "shame", "guilt", "jealousy",
)
STORY_EMOTIONS: tuple[str, ...] = EKMAN6 + EXTENDED_EMOTIONS

# Names and close synonyms of each extended concept, in the style of ``EMOTION_WORDS``.
EXTENDED_EMOTION_WORDS: dict[str, tuple[str, ...]] = {
    "calm": ("calm", "serene", "serenity", "tranquil", "tranquility", "peaceful", "relaxed"),
    "contentment": ("content", "contented", "contentment", "satisfied", "fulfilled"),
    "relief": ("relief", "relieved", "reassured"),
    "gratitude": ("grateful", "gratitude", "thankful", "appreciative", "indebted"),
    "love": (
        "love", "loving", "beloved", "affection", "affectionate", "adore", "adoring",
        "adoration", "fond", "fondness", "devoted", "tenderness",
    ),
    "pride": ("proud", "pride", "prideful"),
    "hope": ("hope", "hopeful", "optimistic", "optimism"),
    "amusement": ("amused", "amusement", "amusing", "hilarious", "funny", "comical"),
    "excitement": (
        "excited", "excitement", "exciting", "thrilled", "eager", "enthusiastic", "enthusiasm",
        "exhilarated",
    ),
    "boredom": ("bored", "boredom", "boring", "tedious", "tedium", "monotonous", "dull"),
    "loneliness": ("lonely", "loneliness", "lonesome", "forlorn", "isolated"),
    "shame": (
        "shame", "ashamed", "shameful", "humiliated", "humiliation", "embarrassed",
        "embarrassment", "mortified",
    ),
    "guilt": ("guilt", "guilty", "remorse", "remorseful", "regret", "regretful", "sorry"),
    "jealousy": ("jealous", "jealousy", "envy", "envious"),
}

STORY_EMOTION_WORDS: dict[str, tuple[str, ...]] = {
    **{e: EMOTION_WORDS[e] for e in EKMAN6},
    **EXTENDED_EMOTION_WORDS,
}

# Feeling words that belong to no single concept (``sev.EXTRA_BANNED_WORDS`` plus the word
# "emotion" itself); the default checker bans them too.
GENERAL_AFFECT_WORDS: tuple[str, ...] = tuple(
    sorted(set(EXTRA_BANNED_WORDS) | {"emotion", "emotional", "emotionally"})
)

# Human valence and arousal of each concept, on Warriner et al.'s 1–9 scales (V.Mean.Sum,
# A.Mean.Sum: mean over all raters; valence 1 = unhappy, 9 = happy; arousal 1 = calm,
# 9 = excited). Read from the rows of the rated lemmas in the CSV of the norms shipped by the
# public repository JULIELab/XANEW, file Ratings_Warriner_et_al.csv
# (commit 8b6e40a1fc17ab5d9f7ad9a1aa817be3075f7a20); the row number of each lemma is given.
HUMAN_VA_SCALE: tuple[float, float] = (1.0, 9.0)
HUMAN_VA_SOURCE = (
    "Warriner, A. B., Kuperman, V., & Brysbaert, M. (2013). Norms of valence, arousal, and "
    "dominance for 13,915 English lemmas. Behavior Research Methods, 45(4), 1191-1207. "
    "https://doi.org/10.3758/s13428-012-0314-x. Columns V.Mean.Sum and A.Mean.Sum (1-9 "
    "scales), read from Ratings_Warriner_et_al.csv in the GitHub repository JULIELab/XANEW "
    "(commit 8b6e40a1fc17ab5d9f7ad9a1aa817be3075f7a20)."
)
HUMAN_VA_LEMMAS: dict[str, str] = {e: e for e in STORY_EMOTIONS}
HUMAN_VA: dict[str, tuple[float, float]] = {
    "anger": (2.50, 5.93),        # row 418, "anger"
    "sadness": (2.40, 2.81),      # row 10587, "sadness"
    "happiness": (8.48, 6.50),    # row 5595, "happiness"
    "fear": (2.93, 6.14),         # row 4524, "fear"
    "surprise": (7.44, 6.57),     # row 12138, "surprise"
    "disgust": (3.32, 5.00),      # row 3569, "disgust"
    "calm": (6.89, 1.67),         # row 1702, "calm"
    "contentment": (6.62, 4.60),  # row 2644, "contentment"
    "relief": (6.63, 4.42),       # row 10124, "relief"
    "gratitude": (6.67, 5.09),    # row 5362, "gratitude"
    "love": (8.00, 5.36),         # row 7246, "love"
    "pride": (6.50, 5.54),        # row 9438, "pride"
    "hope": (7.48, 5.29),         # row 5905, "hope"
    "amusement": (7.00, 4.82),    # row 387, "amusement"
    "excitement": (7.62, 6.21),   # row 4293, "excitement"
    "boredom": (2.77, 2.58),      # row 1373, "boredom"
    "loneliness": (2.35, 4.09),   # row 7207, "loneliness"
    "shame": (2.62, 5.40),        # row 11000, "shame"
    "guilt": (2.29, 4.48),        # row 5473, "guilt"
    "jealousy": (2.58, 5.45),     # row 6674, "jealousy"
}


def human_va_unit() -> dict[str, tuple[float, float]]:
    """:data:`HUMAN_VA` rescaled from 1–9 to [-1, 1] (``(x - 5) / 4``), the range of
    ``emocircuits.emotions.VA_COORDINATES``."""
    lo, hi = HUMAN_VA_SCALE
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    return {e: ((v - mid) / half, (a - mid) / half) for e, (v, a) in HUMAN_VA.items()}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Story:
    """One story (or neutral text): who feels what, told in which person, on which topic."""

    id: str
    emotion: str
    person: str
    topic: str
    text: str

    @property
    def is_neutral(self) -> bool:
        return self.emotion == NEUTRAL

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


StoryProblem = DataProblem
"""One defect in a story file: where (file, 1-based line, field) and what."""


class StoryFormatError(ValueError):
    """Story rows that do not follow the format; ``problems`` lists every defect."""

    def __init__(self, problems: Sequence[StoryProblem], source: str) -> None:
        self.problems: list[StoryProblem] = list(problems)
        self.source = source
        super().__init__(
            f"{len(self.problems)} problem(s) in story file {source}:\n"
            + "\n".join(str(p) for p in self.problems)
        )


_KNOWN_EMOTIONS: tuple[str, ...] = STORY_EMOTIONS + (NEUTRAL,)


def _row_problems(obj: Any, file: str, line: int) -> list[StoryProblem]:
    if not isinstance(obj, dict):
        return [StoryProblem(file, line, "<row>",
                             f"must be a JSON object, got {type(obj).__name__}")]
    out = []
    for f in REQUIRED_FIELDS:
        if f not in obj:
            out.append(StoryProblem(file, line, f, "missing"))
            continue
        v = obj[f]
        if not isinstance(v, str):
            out.append(StoryProblem(file, line, f, f"must be a string, got {type(v).__name__}"))
        elif not v.strip():
            out.append(StoryProblem(file, line, f, "must not be empty"))
    emo, person = obj.get("emotion"), obj.get("person")
    if isinstance(emo, str) and emo.strip() and emo not in _KNOWN_EMOTIONS:
        out.append(StoryProblem(file, line, "emotion",
                                f"unknown emotion {emo!r}; expected one of {list(_KNOWN_EMOTIONS)}"))
    if isinstance(person, str) and person.strip() and person not in PERSONS:
        out.append(StoryProblem(file, line, "person",
                                f"must be one of {list(PERSONS)}, got {person!r}"))
    return out


def parse_stories(text: str | bytes, *, source: str = "<string>") -> list[Story]:
    """Parse JSONL story rows; raise :class:`StoryFormatError` listing every bad row.

    Blank lines are skipped; fields beyond :data:`REQUIRED_FIELDS` are ignored."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StoryFormatError([StoryProblem(source, 0, "<file>", f"not UTF-8: {exc}")],
                                   source) from None
    problems: list[StoryProblem] = []
    stories: list[Story] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append(StoryProblem(source, lineno, "<json>", f"invalid JSON: {exc.msg}"))
            continue
        row_problems = _row_problems(obj, source, lineno)
        if row_problems:
            problems.extend(row_problems)
            continue
        sid = obj["id"]
        if sid in first_line:
            problems.append(StoryProblem(source, lineno, "id",
                                         f"duplicate id {sid!r} (first used on line "
                                         f"{first_line[sid]})"))
            continue
        first_line[sid] = lineno
        stories.append(Story(**{f: obj[f] for f in REQUIRED_FIELDS}))
    if problems:
        raise StoryFormatError(problems, source)
    return stories


@lru_cache(maxsize=1)
def _builtin_stories() -> tuple[Story, ...]:
    data = resources.files(__package__).joinpath("builtin").joinpath(BUILTIN_FILE).read_bytes()
    return tuple(parse_stories(data, source=f"builtin/{BUILTIN_FILE}"))


def load_stories(
    path: str | os.PathLike[str] | None = None,
    *,
    emotions: Iterable[str] | None = None,
    split: str | None = None,
) -> list[Story]:
    """Load stories from ``path`` (default: the builtin corpus), in file order.

    ``emotions`` keeps only those emotions (``"neutral"`` included if named); ``split`` keeps
    only one of :data:`SPLITS` as given by :func:`story_splits` with its defaults, computed
    over the whole file before the emotion filter (so filtering never moves a topic).

    >>> stories = load_stories(emotions=["fear", "neutral"], split="test")
    """
    if path is None:
        stories = list(_builtin_stories())
    else:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise FileNotFoundError(f"load_stories: cannot read {p}: {exc}") from exc
        stories = parse_stories(data, source=str(p))
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"load_stories: split must be one of {list(SPLITS)} or None, "
                             f"got {split!r}")
        stories = story_splits(stories)[split]
    if emotions is not None:
        wanted = [emotions] if isinstance(emotions, str) else list(emotions)
        unknown = [e for e in wanted if e not in _KNOWN_EMOTIONS]
        if unknown:
            raise ValueError(f"load_stories: unknown emotion(s) {unknown}; expected names "
                             f"from {list(_KNOWN_EMOTIONS)}")
        keep = set(wanted)
        stories = [s for s in stories if s.emotion in keep]
    return stories


# --------------------------------------------------------------------------- splits


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) != len(SPLITS) or any(not math.isfinite(f) or f <= 0 for f in fr):
        raise ValueError(f"story_splits: fractions must be {len(SPLITS)} positive numbers "
                         f"for {list(SPLITS)}, got {tuple(fractions)}")
    if abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"story_splits: fractions must sum to 1, got {fr} (sum {sum(fr)})")
    return fr  # type: ignore[return-value]


def topic_splits(
    stories: Sequence[Story],
    *,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    attempts: int = 2000,
) -> dict[str, str]:
    """Assign each topic to one of :data:`SPLITS` (topic -> split).

    Deterministic for a given ``seed``: ``attempts`` seeded orderings of the topics are each
    filled greedily (a topic goes to the split furthest below its target share of stories);
    of the assignments in which every emotion occurs in every split, the one whose split
    sizes are closest to ``fractions`` is returned. Raises ``ValueError`` when no assignment
    puts every emotion in every split."""
    fr = _check_fractions(fractions)
    stories = list(stories)
    if not stories:
        raise ValueError("story_splits: no stories to split")
    topics = sorted({s.topic for s in stories})
    all_emotions = {s.emotion for s in stories}
    if len(topics) < len(SPLITS):
        raise ValueError(f"story_splits: need at least {len(SPLITS)} topics to split by "
                         f"topic, got {len(topics)}: {topics}")
    size = {t: 0 for t in topics}
    emos: dict[str, set[str]] = {t: set() for t in topics}
    for s in stories:
        size[s.topic] += 1
        emos[s.topic].add(s.emotion)
    thin = {e: sorted(t for t in topics if e in emos[t]) for e in sorted(all_emotions)}
    thin = {e: ts for e, ts in thin.items() if len(ts) < len(SPLITS)}
    if thin:
        raise ValueError("story_splits: every emotion needs stories in at least "
                         f"{len(SPLITS)} topics to appear in every split; too few for "
                         + "; ".join(f"{e!r} (topics {ts})" for e, ts in thin.items()))
    n = len(stories)
    targets = [f * n for f in fr]
    rng = np.random.default_rng(seed)
    best: tuple[float, dict[str, str]] | None = None
    for _ in range(max(1, int(attempts))):
        order = [topics[i] for i in rng.permutation(len(topics))]
        sizes = [0] * len(SPLITS)
        got: list[set[str]] = [set() for _ in SPLITS]
        assign: dict[str, str] = {}
        for t in order:
            k = max(range(len(SPLITS)), key=lambda i: ((targets[i] - sizes[i]) / targets[i], -i))
            assign[t] = SPLITS[k]
            sizes[k] += size[t]
            got[k] |= emos[t]
        if any(g != all_emotions for g in got):
            continue
        cost = sum(abs(sz - tg) for sz, tg in zip(sizes, targets, strict=True)) / n
        if best is None or cost < best[0] - 1e-12:
            best = (cost, {t: assign[t] for t in topics})
    if best is None:
        raise ValueError(f"story_splits: found no assignment of the {len(topics)} topics to "
                         f"{list(SPLITS)} that puts every emotion in every split "
                         f"(tried {attempts} seeded orderings with seed={seed})")
    return best[1]


def story_splits(
    stories: Sequence[Story],
    *,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> dict[str, list[Story]]:
    """Split stories by topic into ``{"train", "validation", "test"}`` (input order kept).

    All stories of a topic go to the same split; every emotion present in ``stories`` is in
    every split; sizes approximate ``fractions``. See :func:`topic_splits`."""
    assign = topic_splits(stories, fractions=fractions, seed=seed)
    out: dict[str, list[Story]] = {s: [] for s in SPLITS}
    for s in stories:
        out[assign[s.topic]].append(s)
    return out


# --------------------------------------------------------------------------- word checker

_VOWELS = frozenset("aeiou")
_TOKEN = re.compile(r"[^\W\d_]+")


def _plural(w: str) -> str:
    if w.endswith(("s", "sh", "ch", "x", "z")):
        return w + "es"
    if len(w) > 1 and w.endswith("y") and w[-2] not in _VOWELS:
        return w[:-1] + "ies"
    return w + "s"


def _cons_y(w: str) -> bool:
    return len(w) > 1 and w.endswith("y") and w[-2] not in _VOWELS


def _cvc(w: str) -> bool:
    """Ends consonant-vowel-consonant (final not w/x/y): the final consonant doubles."""
    return (len(w) >= 3 and w[-1] not in _VOWELS and w[-1] not in "wxy"
            and w[-2] in _VOWELS and w[-3] not in _VOWELS)


def _doubled(w: str) -> str:
    return w + ("k" if w.endswith("c") else w[-1])


def _verb_bases(stem: str) -> set[str]:
    """Base forms of a verb whose -ed/-ing stem is ``stem`` (scar -> scare, stunn -> stun)."""
    if len(stem) < 2:
        return {stem}
    if stem.endswith(("ss", "sh", "ch", "x", "zz")) or (stem[-1] == "y" and stem[-2] in _VOWELS):
        return {stem}
    if stem.endswith("ck"):
        return {stem, stem[:-1]}                      # shock; panick -> panic
    if stem[-1] == stem[-2] and stem[-1] not in _VOWELS:
        return {stem, stem[:-1]}                      # thrill; stunn -> stun
    if stem.endswith(("er", "en")):
        return {stem}                                 # bewilder, frighten
    if stem[-1] not in _VOWELS and stem[-1] not in "wxy" and stem[-2] in _VOWELS:
        return {stem + "e"}                           # scar -> scare, amus -> amuse
    if stem.endswith("th") or stem[-1] in "lsvgcz":
        return {stem, stem + "e"}                     # loath(e), startl -> startle
    return {stem}


def inflections(word: str) -> frozenset[str]:
    """Simple English inflections and derivations of one word (lower case).

    Plural / third person (-s, -es, y -> ies), past and participles (-ed, -ing, -edly,
    -ingly; e-drop, y -> ied, consonant doubling: regret -> regretted, sad -> saddened),
    adverbs (-ly, y -> ily, -le -> -ly, -ic -> -ically), -ness, -ful, comparatives (-er,
    -est). A word that is itself a participle also yields its verb (terrified -> terrify,
    terrifying; scared -> scare, scaring but not scar; loathing -> loathe, loathed).
    """
    w = word.strip().lower()
    if not w:
        return frozenset()
    f = {w, _plural(w)}
    participle = (w.endswith("ed") and len(w) > 4) or (w.endswith("ing") and len(w) > 5)
    if participle:
        f |= {w + "ly", w + "ness"}                 # scaredly, scaredness
    elif w.endswith("e"):
        f |= {w + "ly", w + "ness", w + "ful", w + "fully", w + "d", w + "dly", w + "r",
              w + "st", w[:-1] + "ing", w[:-1] + "ingly"}
    elif _cons_y(w):
        i = w[:-1] + "i"                             # angry -> angrily, angrier
        f |= {i + "ly", i + "ness", i + "ful", i + "er", i + "est", i + "ed", i + "es",
              w + "ing", w + "ingly"}
    else:
        f |= {w + "ly", w + "ness", w + "ful", w + "fully", w + "ed", w + "edly", w + "ing",
              w + "ingly", w + "er", w + "est"}
        if w.endswith("ic"):
            f.add(w + "ally")                        # ecstatic -> ecstatically
        if w.endswith("ll"):
            f.add(w + "y")                           # dull -> dully
        if _cvc(w) or w.endswith("c"):
            d = _doubled(w)                          # regret -> regretted, panic -> panicked
            f |= {d + "ed", d + "edly", d + "ing", d + "ingly", d + "er", d + "est"}
            if _cvc(w):
                f |= {d + "en", d + "ens", d + "ened", d + "ening"}   # sad -> sadden
    if w.endswith("le"):
        f.add(w[:-1] + "y")                          # incredible -> incredibly
    # A participle: recover its verb paradigm.
    stem = None
    if w.endswith("ied") and len(w) > 4:
        base = w[:-3] + "y"                          # terrified -> terrify
        f |= {base, base[:-1] + "ies", base + "ing", base + "ingly"}
    elif w.endswith("ed") and len(w) > 4:
        stem = w[:-2]
        f |= {stem + "ing", stem + "ingly"}
    elif w.endswith("ing") and len(w) > 5:
        stem = w[:-3]
        f |= {stem[:-1] + "ied" if _cons_y(stem) else stem + "ed", stem + "edly"}
    if stem is not None:
        for b in _verb_bases(stem):
            f |= {b, _plural(b)}
    return frozenset(x for x in f if x)


def _default_vocabulary() -> tuple[str, ...]:
    words = {w for ws in STORY_EMOTION_WORDS.values() for w in ws}
    return tuple(sorted(words | set(GENERAL_AFFECT_WORDS)))


@lru_cache(maxsize=16)
def _forms(vocab: tuple[str, ...]) -> tuple[dict[str, str], tuple[str, ...]]:
    single: dict[str, str] = {}
    phrases: list[str] = []
    for word in vocab:
        w = word.strip().lower()
        if not w:
            continue
        if len(_TOKEN.findall(w)) > 1:
            phrases.append(w)
            continue
        for form in sorted(inflections(w)):
            single.setdefault(form, w)
    return single, tuple(sorted(set(phrases)))


def emotion_word_forms(words: Iterable[str] | None = None) -> dict[str, str]:
    """Every banned surface form -> the vocabulary word it comes from.

    ``words=None``: every word of every :data:`STORY_EMOTION_WORDS` list plus
    :data:`GENERAL_AFFECT_WORDS`."""
    vocab = _default_vocabulary() if words is None else tuple(sorted({str(w) for w in words}))
    return dict(_forms(vocab)[0])


def find_emotion_words(text: str, words: Iterable[str] | Mapping[str, Iterable[str]] | None = None
                       ) -> list[str]:
    """Emotion words (and their inflections) in ``text``: case-insensitive, whole words only.

    ``words``: a list of words, a mapping concept -> words, or None for every concept's list
    plus :data:`GENERAL_AFFECT_WORDS`. Returns each offending word once, lower case, in order
    of first appearance ("madam" does not match "mad"; "Angrily," matches "angry")."""
    if words is None:
        vocab = _default_vocabulary()
    elif isinstance(words, Mapping):
        vocab = tuple(sorted({str(w) for ws in words.values() for w in ws}))
    else:
        vocab = tuple(sorted({str(w) for w in ([words] if isinstance(words, str) else words)}))
    single, phrases = _forms(vocab)
    low = text.lower()
    hits: list[str] = []
    for tok in _TOKEN.findall(low):
        if tok in single and tok not in hits:
            hits.append(tok)
    for ph in phrases:
        if re.search(r"(?<!\w)" + re.escape(ph) + r"(?!\w)", low) and ph not in hits:
            hits.append(ph)
    return hits


def check_stories(
    stories: Iterable[Story],
    words: Iterable[str] | Mapping[str, Iterable[str]] | None = None,
) -> list[tuple[str, list[str]]]:
    """``(id, offending words)`` for every story whose text contains an emotion word."""
    out = []
    for s in stories:
        hits = find_emotion_words(s.text, words)
        if hits:
            out.append((s.id, hits))
    return out
