"""Labeled emotional utterances: the builtin set and loaders for a user's own files.

The builtin set (``data/builtin/utterances.jsonl``) was written for this project: short
first-person utterances about everyday situations for the six Ekman emotions and
neutral, with a topic ``group`` per row (for group-wise cross-validation), a fixed
stratified ``train``/``test`` split and a ``has_keyword`` flag that says whether the
text names an emotion outright (e.g. "furious", "scared"). Most emotional rows carry no
such keyword, so a probe has to read content and tone rather than spot a word.

A user's own data can be loaded from ``.jsonl`` (one JSON object per line) or ``.csv``
(header row) with the keys/columns ``text`` and ``label`` and, optionally, ``id``,
``group``, ``split`` (``train``/``test``) and ``has_keyword``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, overload

from emocircuits.emotions import EKMAN6, EMOTION_WORDS, NEUTRAL

SPLITS: tuple[str, ...] = ("train", "test")
DEFAULT_GROUP = "ungrouped"
TEST_FRACTION = 0.3
SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl", ".csv")
_BUILTIN_FILE = "builtin/utterances.jsonl"

# Inflections and close synonyms of the emotion words in ``emotions.EMOTION_WORDS``;
# together they decide ``has_keyword`` for rows that do not state it.
# fmt: off
_EXTRA_KEYWORDS: dict[str, tuple[str, ...]] = {
    "anger": (
        "angrier", "angrily", "furiously", "fury", "madder", "annoying", "annoyance",
        "annoys", "irritating", "irritation", "irritates", "outrage", "outrageous",
        "enrages", "frustrating", "frustration", "frustrates", "resent", "resentment",
        "raging", "fume", "fumes", "infuriates", "infuriating", "seething", "incensed",
        "pissed",
    ),
    "sadness": (
        "sadly", "sadder", "saddest", "heartbreaking", "heartbreak", "depressing",
        "depression", "misery", "gloom", "grieve", "grieving", "grieved", "mourn",
        "mourning", "devastating", "despairing", "cry", "cried", "crying", "cries", "tears",
        "weep", "weeping", "wept", "lonely", "loneliness", "hopeless", "upset",
    ),
    "happiness": (
        "happily", "happier", "happiest", "gladly", "delight", "delightful", "thrilling",
        "excitement", "exciting", "gratitude", "thankful", "love", "loved", "lovely",
        "loving", "yay", "hooray", "joyous", "blissful", "bliss",
    ),
    "fear": (
        "fears", "feared", "scare", "scary", "scares", "frightening", "fright",
        "terrifying", "terror", "anxiety", "nervously", "worry", "worrying", "worries",
        "panic", "panicking", "dreading", "dreaded", "horrifying", "horror", "alarming",
        "creepy", "spooked",
    ),
    "surprise": (
        "surprising", "surprisingly", "shock", "shocking", "amazing", "amazement",
        "astonishing", "astonishment", "stunning", "astounding", "unexpectedly", "whoa",
        "disbelief",
    ),
    "disgust": (
        "disgusts", "sickening", "nauseating", "nausea", "repulsive", "yuck", "ew", "eww",
        "icky", "foul", "loathe", "appalling",
    ),
}
# fmt: on

_TOKEN_RE = re.compile(r"[a-z]+")


def emotion_keywords() -> frozenset[str]:
    """All words that count as naming an emotion (lower case, neutral list excluded)."""
    words: set[str] = set()
    for emotion in EKMAN6:
        words.update(w.lower() for w in EMOTION_WORDS.get(emotion, ()))
        words.update(_EXTRA_KEYWORDS.get(emotion, ()))
    return frozenset(words)


def find_emotion_keywords(text: str) -> list[str]:
    """The emotion keywords that occur in ``text`` as whole words, in order."""
    keywords = emotion_keywords()
    return [t for t in _TOKEN_RE.findall(text.lower()) if t in keywords]


def has_emotion_keyword(text: str) -> bool:
    """Whether ``text`` names an emotion outright (see ``emotion_keywords``)."""
    return bool(find_emotion_keywords(text))


@dataclass(frozen=True)
class Utterance:
    """One labeled utterance."""

    id: str
    text: str
    label: str
    group: str = DEFAULT_GROUP
    split: str = "train"
    has_keyword: bool = False


def _class_order(labels: Iterable[str]) -> tuple[str, ...]:
    """Known emotions in EKMAN6 order, then neutral, then any others as first seen."""
    seen = list(dict.fromkeys(labels))
    known = [e for e in (*EKMAN6, NEUTRAL) if e in seen]
    return tuple(known + [lab for lab in seen if lab not in known])


class UtteranceSet(Sequence[Utterance]):
    """An immutable, ordered collection of ``Utterance`` rows."""

    def __init__(self, utterances: Iterable[Utterance], *, name: str = "utterances") -> None:
        self._rows: tuple[Utterance, ...] = tuple(utterances)
        self.name = name

    @overload
    def __getitem__(self, index: int) -> Utterance: ...

    @overload
    def __getitem__(self, index: slice) -> UtteranceSet: ...

    def __getitem__(self, index: int | slice) -> Utterance | UtteranceSet:
        if isinstance(index, slice):
            return UtteranceSet(self._rows[index], name=self.name)
        return self._rows[index]

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Utterance]:
        return iter(self._rows)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UtteranceSet) and self._rows == other._rows

    def __hash__(self) -> int:
        return hash(self._rows)

    def __repr__(self) -> str:
        counts = Counter(u.label for u in self._rows)
        inner = ", ".join(f"{c}={counts[c]}" for c in self.classes)
        return f"UtteranceSet({self.name!r}, n={len(self)}, {inner})"

    @property
    def ids(self) -> list[str]:
        """Row ids, in order."""
        return [u.id for u in self._rows]

    @property
    def texts(self) -> list[str]:
        """Utterance texts, in order."""
        return [u.text for u in self._rows]

    @property
    def labels(self) -> list[str]:
        """Class labels, in order."""
        return [u.label for u in self._rows]

    @property
    def groups(self) -> list[str]:
        """Topic groups, in order (for group-wise cross-validation)."""
        return [u.group for u in self._rows]

    @property
    def splits(self) -> list[str]:
        """``train``/``test`` per row, in order."""
        return [u.split for u in self._rows]

    @property
    def classes(self) -> tuple[str, ...]:
        """Distinct labels: EKMAN6 order, then neutral, then others as first seen."""
        return _class_order(u.label for u in self._rows)

    def label_indices(self, classes: Sequence[str] | None = None) -> list[int]:
        """Each row's label as an index into ``classes`` (default ``self.classes``)."""
        order = tuple(classes) if classes is not None else self.classes
        lookup = {c: i for i, c in enumerate(order)}
        missing = sorted({u.label for u in self._rows} - lookup.keys())
        if missing:
            raise ValueError(f"labels {missing} are not in classes {list(order)}")
        return [lookup[u.label] for u in self._rows]

    def filter(
        self,
        split: str | None = None,
        *,
        label: str | Iterable[str] | None = None,
        group: str | Iterable[str] | None = None,
        has_keyword: bool | None = None,
    ) -> UtteranceSet:
        """Rows matching every given criterion (``None`` means no constraint)."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        labels = {label} if isinstance(label, str) else set(label) if label else None
        groups = {group} if isinstance(group, str) else set(group) if group else None
        rows = (
            u
            for u in self._rows
            if (split is None or u.split == split)
            and (labels is None or u.label in labels)
            and (groups is None or u.group in groups)
            and (has_keyword is None or u.has_keyword == has_keyword)
        )
        return UtteranceSet(rows, name=self.name)

    def per_class(self, m: int, classes: Sequence[str] | None = None) -> UtteranceSet:
        """``m`` rows of each class (``classes`` order, default ``self.classes``) spread over topic
        groups: the first row of every group, then the second, ... (fewer when a class has fewer)."""
        if m < 0:
            raise ValueError(f"per_class: m must be >= 0, got {m}")
        out: list[Utterance] = []
        for c in (self.classes if classes is None else classes):
            rank: dict[str, int] = {}
            keyed = []
            for i, u in enumerate(x for x in self._rows if x.label == c):
                keyed.append((rank.get(u.group, 0), i, u))
                rank[u.group] = rank.get(u.group, 0) + 1
            out += [u for _, _, u in sorted(keyed, key=lambda t: t[:2])[:m]]
        return UtteranceSet(out, name=self.name)

    def to_records(self) -> list[dict[str, Any]]:
        """Rows as plain dicts (the JSONL schema)."""
        return [asdict(u) for u in self._rows]

    def content_hash(self) -> str:
        """SHA-256 over every row's fields, in order (identifies the exact data)."""
        h = hashlib.sha256()
        for record in self.to_records():
            h.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()


# --------------------------------------------------------------------------- loading


def _where(path: str, line: int, kind: str = "line") -> str:
    return f"{path}, {kind} {line}"


def _required(raw: dict[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: field {key!r} is missing or empty")
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value.strip()


def _optional(raw: dict[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str | int):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return str(value).strip()


def _parse_bool(value: Any, where: str) -> bool | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "1", "yes", "y"}:
        return True
    if text in {"false", "0", "no", "n"}:
        return False
    raise ValueError(f"{where}: field 'has_keyword' must be true/false, got {value!r}")


@dataclass
class _Row:
    where: str
    text: str
    label: str
    id: str | None
    group: str | None
    split: str | None
    has_keyword: bool | None


def _parse_row(raw: dict[str, Any], where: str) -> _Row:
    text = _required(raw, "text", where)
    label = _required(raw, "label", where).lower()
    split = _optional(raw, "split", where)
    if split is not None:
        split = split.lower()
        if split not in SPLITS:
            raise ValueError(f"{where}: field 'split' must be one of {SPLITS}, got {split!r}")
    return _Row(
        where=where,
        text=text,
        label=label,
        id=_optional(raw, "id", where),
        group=_optional(raw, "group", where),
        split=split,
        has_keyword=_parse_bool(raw.get("has_keyword"), where),
    )


def _read_jsonl(path: Path) -> list[_Row]:
    rows: list[_Row] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = _where(str(path), lineno)
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{where}: invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(raw, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
            rows.append(_parse_row(raw, where))
    return rows


def _read_csv(path: Path) -> list[_Row]:
    rows: list[_Row] = []
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        for key in ("text", "label"):
            if key not in header:
                raise ValueError(
                    f"{path}, line 1 (header): field {key!r} is missing; columns are {header}"
                )
        reader.fieldnames = header
        for rowno, raw in enumerate(reader, start=1):
            if not any((v or "").strip() for k, v in raw.items() if k is not None):
                continue
            where = f"{path}, row {rowno} (line {reader.line_num})"
            rows.append(_parse_row(dict(raw), where))
    return rows


def _assign_splits(rows: list[_Row]) -> dict[int, str]:
    """Deterministic stratified split for rows that state none: ~30% test per label."""
    by_label: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row.split is None:
            by_label.setdefault(row.label, []).append(i)
    assigned: dict[int, str] = {}
    for indices in by_label.values():
        ordered = sorted(
            indices, key=lambda i: hashlib.sha256(rows[i].text.encode("utf-8")).hexdigest()
        )
        n_test = round(TEST_FRACTION * len(ordered)) if len(ordered) > 1 else 0
        for rank, i in enumerate(ordered):
            assigned[i] = "test" if rank < n_test else "train"
    return assigned


def _build(rows: list[_Row], source: str) -> UtteranceSet:
    if not rows:
        raise ValueError(f"{source}: no utterances found")
    splits = _assign_splits(rows)
    counters: Counter[str] = Counter()
    seen_ids: dict[str, str] = {}
    out: list[Utterance] = []
    for i, row in enumerate(rows):
        uid = row.id
        if uid is None:
            while True:
                uid = f"{row.label}_{counters[row.label]:03d}"
                counters[row.label] += 1
                if uid not in seen_ids:
                    break
        if uid in seen_ids:
            raise ValueError(f"{row.where}: field 'id' duplicates {uid!r} from {seen_ids[uid]}")
        seen_ids[uid] = row.where
        out.append(
            Utterance(
                id=uid,
                text=row.text,
                label=row.label,
                group=row.group or DEFAULT_GROUP,
                split=row.split or splits[i],
                has_keyword=(
                    row.has_keyword
                    if row.has_keyword is not None
                    else has_emotion_keyword(row.text)
                ),
            )
        )
    return UtteranceSet(out, name=source)


def builtin_path() -> Path:
    """Filesystem path of the builtin ``utterances.jsonl``."""
    return Path(str(resources.files("emocircuits.data").joinpath(_BUILTIN_FILE)))


def load_utterances(source: str | Path = "builtin", split: str | None = None) -> UtteranceSet:
    """Load the builtin set or a user's ``.jsonl``/``.csv`` file, optionally one split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if isinstance(source, str) and source == "builtin":
        path, name = builtin_path(), "builtin"
    else:
        path = Path(source)
        name = str(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"{path}: unknown file extension {path.suffix!r}; "
            f"expected one of {SUPPORTED_SUFFIXES} (or source='builtin')"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = _read_jsonl(path) if suffix == ".jsonl" else _read_csv(path)
    uset = _build(rows, name)
    return uset.filter(split=split) if split is not None else uset


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class UtteranceStats:
    """Counts for an ``UtteranceSet`` and the problems found in it."""

    n: int
    per_class: dict[str, int]
    per_split: dict[str, int]
    per_class_split: dict[str, dict[str, int]]
    keyword_share: dict[str, float]
    groups_per_class: dict[str, int]
    problems: tuple[str, ...]

    def format(self) -> str:
        """A plain-text table of the counts, then any problems."""
        lines = [f"{'class':<11}{'train':>7}{'test':>6}{'total':>7}{'keyword':>9}{'groups':>8}"]
        for c, n in self.per_class.items():
            sp = self.per_class_split[c]
            lines.append(
                f"{c:<11}{sp.get('train', 0):>7}{sp.get('test', 0):>6}{n:>7}"
                f"{self.keyword_share[c]:>9.0%}{self.groups_per_class[c]:>8}"
            )
        lines.append(
            f"{'total':<11}{self.per_split.get('train', 0):>7}"
            f"{self.per_split.get('test', 0):>6}{self.n:>7}"
        )
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def check_utterances(
    data: UtteranceSet | str | Path = "builtin", *, min_per_class: int = 0
) -> UtteranceStats:
    """Counts per class/split/keyword, and problems (duplicates, one-split classes...)."""
    uset = data if isinstance(data, UtteranceSet) else load_utterances(data)
    classes = uset.classes
    per_class = {c: 0 for c in classes}
    per_class_split: dict[str, dict[str, int]] = {c: dict.fromkeys(SPLITS, 0) for c in classes}
    keyword = dict.fromkeys(classes, 0)
    groups: dict[str, set[str]] = {c: set() for c in classes}
    for u in uset:
        per_class[u.label] += 1
        per_class_split[u.label][u.split] += 1
        keyword[u.label] += int(u.has_keyword)
        groups[u.label].add(u.group)
    problems: list[str] = []
    dup_ids = [i for i, n in Counter(uset.ids).items() if n > 1]
    if dup_ids:
        problems.append(f"duplicate ids: {dup_ids[:5]}")
    norm = Counter(" ".join(t.lower().split()) for t in uset.texts)
    dup_texts = [t for t, n in norm.items() if n > 1]
    if dup_texts:
        problems.append(f"{len(dup_texts)} duplicate texts, e.g. {dup_texts[0]!r}")
    for c in classes:
        missing = [s for s in SPLITS if per_class_split[c][s] == 0]
        if missing:
            problems.append(f"class {c!r} has no {'/'.join(missing)} rows")
        if per_class[c] < min_per_class:
            problems.append(f"class {c!r} has {per_class[c]} rows (< {min_per_class})")
    return UtteranceStats(
        n=len(uset),
        per_class=per_class,
        per_split={s: sum(per_class_split[c][s] for c in classes) for s in SPLITS},
        per_class_split=per_class_split,
        keyword_share={c: keyword[c] / per_class[c] for c in classes},
        groups_per_class={c: len(groups[c]) for c in classes},
        problems=tuple(problems),
    )
