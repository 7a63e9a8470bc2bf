"""SEV data: Scenario–Event–Valence records, their loader, validator, writer and checks.

A SEV record is one neutral first-person *scenario* and three *event* outcomes of it, one
per valence (positive, neutral, negative). On disk it is one JSON object per line::

    {"skeleton_id": "work_000", "theme": "Work/Job", "scenario": "...",
     "event": {"positive": "...", "neutral": "...", "negative": "..."}}

Fields beyond these four are kept, in order, in ``SEVRecord.extra`` and written back out.

Sources accepted by :func:`load_sev`: a path to a JSONL file, or ``"builtin:train"``,
``"builtin:validation"``, ``"builtin:test"``, ``"builtin:all"`` for the dataset shipped in
``emocircuits/data/builtin/sev_builtin.jsonl`` (its ``split`` field holds the fixed splits).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, overload

from emocircuits.emotions import all_emotion_words
from emocircuits.results import atomic_write_text

__all__ = [
    "BUILTIN_FILE",
    "BUILTIN_SPLITS",
    "EXTRA_BANNED_WORDS",
    "REQUIRED_FIELDS",
    "THEMES",
    "VALENCES",
    "EmotionWordHit",
    "SEVDataset",
    "DataProblem",
    "SEVProblem",
    "SEVRecord",
    "SEVValidationError",
    "banned_word_forms",
    "check_no_emotion_words",
    "load_sev",
    "parse_sev_text",
    "save_sev",
    "validate_sev",
]

VALENCES: tuple[str, ...] = ("positive", "neutral", "negative")
REQUIRED_FIELDS: tuple[str, ...] = ("skeleton_id", "theme", "scenario", "event")
BUILTIN_SPLITS: tuple[str, ...] = ("train", "validation", "test")
BUILTIN_FILE = "sev_builtin.jsonl"

# skeleton_id prefix -> theme label, as the paper's SEV file spells the themes.
THEMES: dict[str, str] = {
    "work": "Work/Job",
    "school": "School/Academia",
    "relation": "Personal relationships",
    "shopping": "Customer service/Shopping",
    "administration": "Public services/Administration",
    "health": "Health/Medical",
    "living": "Housing/Living facilities",
    "travel": "Travel/Transportation",
}

# Feeling words missing from ``emocircuits.emotions`` that SEV text must not contain either.
# Matched as whole words with the same simple inflections as the builtin vocabulary.
EXTRA_BANNED_WORDS: tuple[str, ...] = (
    "upset", "disappointed", "disappointment", "disappointing", "relieved", "relief",
    "worry", "worrying", "annoying", "annoyance", "frustrating", "frustration", "irritating",
    "irritation", "fury", "resentment", "outrage", "scare", "scary", "frightening", "fright",
    "terrifying", "terror", "horror", "panic", "anxiety", "apprehension", "stressed",
    "stressful", "shocking", "amazing", "amazement", "astonishing", "astonishment",
    "disbelief", "delight", "joyous", "blissful", "bliss", "elation", "euphoric",
    "satisfied", "dissatisfied", "unsatisfied", "pleasant", "unpleasant", "enjoy", "proud",
    "pride", "ashamed", "shame", "embarrassed", "embarrassing", "guilty", "lonely",
    "jealous", "envious", "bored", "boring", "hopeful", "hopeless", "heartbreaking",
    "distressed", "distress", "grieving", "sorry", "gratitude", "thankful", "hate", "hated",
    "awful", "horrible", "terrible", "fantastic",
)


class SEVValidationError(ValueError):
    """SEV input that does not follow the format; ``problems`` lists every defect."""

    def __init__(self, problems: Sequence[SEVProblem], source: str | None = None) -> None:
        self.problems: list[SEVProblem] = list(problems)
        self.source = source
        head = f"{len(self.problems)} problem(s) in SEV data"
        if source:
            head += f" from {source}"
        super().__init__(head + ":\n" + "\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class DataProblem:
    """One defect in a data file (SEV, stories): where (file, 1-based line, field) and what."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


SEVProblem = DataProblem
"""A defect in a SEV file (the name SEV loading has always used)."""


def _text_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable text field, or None when it is."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value.strip():
        return "must not be empty"
    return None


@dataclass(frozen=True)
class SEVRecord:
    """One scenario with its three valenced events; unknown fields live in ``extra``."""

    skeleton_id: str
    theme: str
    scenario: str
    event: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = _record_problems(
            {"skeleton_id": self.skeleton_id, "theme": self.theme, "scenario": self.scenario,
             "event": self.event},
            file="<SEVRecord>",
            line=0,
        )
        if problems:
            raise SEVValidationError(problems)
        # Own copies, in canonical valence order, so callers' dicts cannot alias ours.
        object.__setattr__(self, "event", {v: self.event[v] for v in VALENCES})
        object.__setattr__(self, "extra", dict(self.extra))
        clash = set(self.extra) & set(REQUIRED_FIELDS)
        if clash:
            raise SEVValidationError(
                [SEVProblem("<SEVRecord>", 0, "extra", f"repeats core field(s) {sorted(clash)}")]
            )
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise SEVValidationError(
                [SEVProblem("<SEVRecord>", 0, "extra", f"must be plain JSON data ({exc})")]
            ) from None

    def __hash__(self) -> int:
        return hash(_canonical_json(self.to_dict()))

    @property
    def split(self) -> str | None:
        """The ``split`` extra field, if the file has one."""
        value = self.extra.get("split")
        return value if isinstance(value, str) else None

    def event_for(self, valence: str) -> str:
        """The event sentence of one valence."""
        if valence not in VALENCES:
            raise KeyError(f"unknown valence {valence!r}; expected one of {VALENCES}")
        return self.event[valence]

    def pairs(self) -> Iterator[tuple[str, str]]:
        """``(valence, event)`` in VALENCES order."""
        for v in VALENCES:
            yield v, self.event[v]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this record (core fields first, then extras in order)."""
        out: dict[str, Any] = {
            "skeleton_id": self.skeleton_id,
            "theme": self.theme,
            "scenario": self.scenario,
            "event": dict(self.event),
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, obj: Any, *, file: str = "<dict>", line: int = 0) -> SEVRecord:
        """Build a record from a parsed JSON object; raises ``SEVValidationError``."""
        problems = _record_problems(obj, file=file, line=line)
        if problems:
            raise SEVValidationError(problems)
        extra = {k: v for k, v in obj.items() if k not in REQUIRED_FIELDS}
        return cls(
            skeleton_id=obj["skeleton_id"],
            theme=obj["theme"],
            scenario=obj["scenario"],
            event=obj["event"],
            extra=extra,
        )


def _record_problems(obj: Any, *, file: str, line: int) -> list[SEVProblem]:
    """Every defect of one parsed line (duplicate ids are checked by the caller)."""
    if not isinstance(obj, dict):
        return [SEVProblem(file, line, "<record>",
                           f"must be a JSON object, got {_json_type(obj)}")]
    problems: list[SEVProblem] = []
    for name in ("skeleton_id", "theme", "scenario"):
        if name not in obj:
            problems.append(SEVProblem(file, line, name, "missing"))
            continue
        why = _text_problem(obj[name])
        if why:
            problems.append(SEVProblem(file, line, name, why))
    if "event" not in obj:
        problems.append(SEVProblem(file, line, "event", "missing"))
        return problems
    event = obj["event"]
    if not isinstance(event, dict):
        problems.append(SEVProblem(file, line, "event",
                                   f"must be an object with keys {list(VALENCES)}, "
                                   f"got {_json_type(event)}"))
        return problems
    for key in event:
        if key not in VALENCES:
            problems.append(SEVProblem(file, line, f"event.{key}",
                                       f"unknown valence; expected one of {list(VALENCES)}"))
    for v in VALENCES:
        if v not in event:
            problems.append(SEVProblem(file, line, f"event.{v}", "missing"))
            continue
        why = _text_problem(event[v])
        if why:
            problems.append(SEVProblem(file, line, f"event.{v}", why))
    return problems


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` object hook that refuses repeated keys instead of keeping the last."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    """``json`` hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"),
                      allow_nan=False)


def _split_lines(text: str | bytes) -> list[str | UnicodeDecodeError]:
    """Lines split on ``\\n`` only; an undecodable byte line becomes its decode error."""
    if isinstance(text, str):
        return list(text.split("\n"))
    out: list[str | UnicodeDecodeError] = []
    for raw in text.split(b"\n"):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            out.append(exc)
    return out


def parse_sev_text(
    text: str | bytes, *, file: str = "<string>"
) -> tuple[list[SEVRecord], list[SEVProblem]]:
    """Parse JSONL text into records and the list of every problem found.

    Lines are split on ``\\n`` only (JSON strings may hold other line separators); blank
    lines are skipped; line numbers are 1-based.
    """
    records: list[SEVRecord] = []
    problems: list[SEVProblem] = []
    first_line: dict[str, int] = {}
    for lineno, line_or_error in enumerate(_split_lines(text), start=1):
        if isinstance(line_or_error, UnicodeDecodeError):
            problems.append(SEVProblem(file, lineno, "<line>",
                                       f"not valid UTF-8 ({line_or_error})"))
            continue
        line = line_or_error
        if lineno == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys,
                             parse_constant=_reject_constant)
        except _DuplicateKey as exc:
            problems.append(SEVProblem(file, lineno, str(exc), "key appears more than once"))
            continue
        except (ValueError, RecursionError) as exc:
            problems.append(SEVProblem(file, lineno, "<line>", f"invalid JSON ({exc})"))
            continue
        line_problems = _record_problems(obj, file=file, line=lineno)
        if line_problems:
            problems.extend(line_problems)
            sid = obj.get("skeleton_id") if isinstance(obj, dict) else None
        else:
            record = SEVRecord.from_dict(obj, file=file, line=lineno)
            records.append(record)
            sid = record.skeleton_id
        if isinstance(sid, str) and sid.strip():
            if sid in first_line:
                problems.append(SEVProblem(file, lineno, "skeleton_id",
                                           f"duplicate {sid!r} (first on line "
                                           f"{first_line[sid]})"))
            else:
                first_line[sid] = lineno
    if not records and not problems:
        problems.append(SEVProblem(file, 0, "<file>", "no records (empty file)"))
    return records, problems


def validate_sev(path: str | os.PathLike[str]) -> list[SEVProblem]:
    """Every problem in a SEV JSONL file (empty list when it is valid)."""
    p = Path(path)
    return parse_sev_text(p.read_bytes(), file=str(p))[1]


class SEVDataset(Sequence[SEVRecord]):
    """An immutable, named sequence of SEV records."""

    def __init__(self, records: Iterable[SEVRecord], name: str = "sev") -> None:
        self._records: tuple[SEVRecord, ...] = tuple(records)
        self.name = name

    @property
    def records(self) -> tuple[SEVRecord, ...]:
        return self._records

    @overload
    def __getitem__(self, index: int) -> SEVRecord: ...

    @overload
    def __getitem__(self, index: slice) -> SEVDataset: ...

    def __getitem__(self, index: int | slice) -> SEVRecord | SEVDataset:
        if isinstance(index, slice):
            return SEVDataset(self._records[index], name=self.name)
        return self._records[index]

    def __len__(self) -> int:
        return len(self._records)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SEVDataset):
            return self._records == other._records
        if isinstance(other, (list, tuple)):
            return self._records == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SEVDataset(name={self.name!r}, n={len(self)}, themes={len(self.themes())})"

    def themes(self) -> list[str]:
        """Distinct themes in first-seen order."""
        return list(dict.fromkeys(r.theme for r in self._records))

    def by_theme(self) -> dict[str, list[SEVRecord]]:
        """Records grouped by theme (first-seen theme order)."""
        out: dict[str, list[SEVRecord]] = {}
        for r in self._records:
            out.setdefault(r.theme, []).append(r)
        return out

    def get(self, skeleton_id: str) -> SEVRecord:
        """The record with this skeleton_id."""
        for r in self._records:
            if r.skeleton_id == skeleton_id:
                return r
        raise KeyError(skeleton_id)

    def content_hash(self) -> str:
        """Stable sha256 of the records' content (field order and file layout ignored)."""
        h = hashlib.sha256()
        for r in self._records:
            h.update(_canonical_json(r.to_dict()).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()


@lru_cache(maxsize=1)
def _builtin_records() -> tuple[SEVRecord, ...]:
    name = f"builtin/{BUILTIN_FILE}"
    data = resources.files(__package__).joinpath("builtin").joinpath(BUILTIN_FILE).read_bytes()
    records, problems = parse_sev_text(data, file=name)
    problems += [
        SEVProblem(name, 0, "split", f"{r.skeleton_id}: must be one of {BUILTIN_SPLITS}")
        for r in records
        if r.split not in BUILTIN_SPLITS
    ]
    if problems:
        raise SEVValidationError(problems, source=name)
    return tuple(records)


def load_sev(source: str | os.PathLike[str], *, name: str | None = None) -> SEVDataset:
    """Load SEV records from a JSONL path or ``builtin:{train,validation,test,all}``.

    Raises ``SEVValidationError`` listing every problem (``file:line: field: what``) when
    the file does not follow the format, ``FileNotFoundError`` when it does not exist.

    Example::

        >>> train = load_sev("builtin:train")              # an SEVDataset of SEVRecords
        >>> len(train), train[0].skeleton_id
        (160, 'work_003')
        >>> sorted(train[0].event)                         # one event per valence
        ['negative', 'neutral', 'positive']
    """
    if isinstance(source, str) and source.startswith("builtin:"):
        split = source.removeprefix("builtin:")
        if split != "all" and split not in BUILTIN_SPLITS:
            raise ValueError(
                f"unknown builtin SEV split {split!r}; use one of "
                f"{['builtin:' + s for s in (*BUILTIN_SPLITS, 'all')]}"
            )
        records = _builtin_records()
        if split != "all":
            records = tuple(r for r in records if r.split == split)
        return SEVDataset(records, name=name or source)
    path = Path(source)
    records_list, problems = parse_sev_text(path.read_bytes(), file=str(path))
    if problems:
        raise SEVValidationError(problems, source=str(path))
    return SEVDataset(records_list, name=name or path.stem)


def save_sev(records: Iterable[SEVRecord], path: str | os.PathLike[str]) -> Path:
    """Write records as JSONL atomically (``results.atomic_write_text``, fsynced)."""
    records = list(records)
    seen: dict[str, int] = {}
    problems: list[SEVProblem] = []
    for i, r in enumerate(records, start=1):
        if not isinstance(r, SEVRecord):
            problems.append(SEVProblem("<records>", i, "<record>",
                                       f"must be an SEVRecord, got {type(r).__name__}"))
            continue
        if r.skeleton_id in seen:
            problems.append(SEVProblem("<records>", i, "skeleton_id",
                                       f"duplicate {r.skeleton_id!r} (first at {seen[r.skeleton_id]})"))
        seen.setdefault(r.skeleton_id, i)
    if problems:
        raise SEVValidationError(problems, source="save_sev")
    text = "".join(json.dumps(r.to_dict(), ensure_ascii=False, allow_nan=False) + "\n"
                   for r in records)
    return atomic_write_text(path, text, fsync=True)


# --------------------------------------------------------------------------- emotion words

_TOKEN = re.compile(r"[a-z]+")
_VOWELS = frozenset("aeiou")


def _inflections(word: str) -> set[str]:
    """Simple English inflections of one word (-s/-es/-ed/-ly/-ness/-er/-est/-ing, ...)."""
    w = word.lower()
    forms = {w}
    suffixes = ("s", "es", "ed", "d", "ly", "ness", "er", "est", "ing", "ingly", "edly",
                "ful", "fully")
    forms.update(w + s for s in suffixes)
    if w.endswith("e"):  # surprise -> surprising, surprisingly
        forms.update(w[:-1] + s for s in ("ing", "ingly", "ed", "er", "est"))
    if w.endswith("y") and len(w) > 2 and w[-2] not in _VOWELS:  # angry -> angrily
        stem = w[:-1] + "i"
        forms.update(stem + s for s in ("ly", "ness", "er", "est", "ed", "es"))
    if w.endswith("le"):  # incredible -> incredibly
        forms.add(w[:-1] + "y")
    if (len(w) >= 3 and w[-1] not in _VOWELS and w[-1] not in "wxy"
            and w[-2] in _VOWELS and w[-3] not in _VOWELS):  # sad -> sadder, mad -> madden
        forms.update(w + w[-1] + s for s in ("er", "est", "en", "ened", "ed", "ing"))
    return forms


def banned_word_forms(words: Iterable[str] | None = None) -> dict[str, str]:
    """Map every banned surface form to the vocabulary word it comes from.

    Defaults to ``all_emotion_words()`` plus ``EXTRA_BANNED_WORDS``. Multi-word entries are
    kept as lower-case phrases (matched on word boundaries, without inflection).
    """
    vocab = sorted(set(all_emotion_words()) | set(EXTRA_BANNED_WORDS)) if words is None \
        else sorted({w.lower().strip() for w in words if w.strip()})
    out: dict[str, str] = {}
    for word in vocab:
        if " " in word or "-" in word:
            out.setdefault(word, word)
            continue
        for form in sorted(_inflections(word)):
            out.setdefault(form, word)
    return out


@dataclass(frozen=True)
class EmotionWordHit:
    """An emotion word found in a SEV record's scenario or event."""

    skeleton_id: str
    field: str
    word: str
    root: str
    text: str

    def __str__(self) -> str:
        root = "" if self.root == self.word else f" (form of {self.root!r})"
        return f"{self.skeleton_id}: {self.field}: emotion word {self.word!r}{root}"


def check_no_emotion_words(
    records: Iterable[SEVRecord], *, words: Iterable[str] | None = None
) -> list[EmotionWordHit]:
    """Every emotion word (with simple inflections) in scenarios and events.

    Whole words only, case-insensitive; the vocabulary defaults to the project's emotion
    words (``emocircuits.emotions.all_emotion_words``) plus ``EXTRA_BANNED_WORDS``.
    """
    forms = banned_word_forms(words)
    phrases = {f: r for f, r in forms.items() if " " in f or "-" in f}
    hits: list[EmotionWordHit] = []
    for rec in records:
        fields = [("scenario", rec.scenario)] + [(f"event.{v}", e) for v, e in rec.pairs()]
        for name, text in fields:
            low = text.lower()
            for token in _TOKEN.findall(low):
                if token in forms:
                    hits.append(EmotionWordHit(rec.skeleton_id, name, token, forms[token], text))
            for phrase, root in phrases.items():
                if re.search(rf"(?<![a-z]){re.escape(phrase)}(?![a-z])", low):
                    hits.append(EmotionWordHit(rec.skeleton_id, name, phrase, root, text))
    return hits
