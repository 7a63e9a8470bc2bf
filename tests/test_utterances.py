"""Tests for the builtin utterance set and the user-file loaders."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from emocircuits.data.utterances import (
    Utterance,
    UtteranceSet,
    check_utterances,
    has_emotion_keyword,
    load_utterances,
)

EMOTIONS = ("anger", "sadness", "happiness", "fear", "surprise", "disgust")
CLASSES = (*EMOTIONS, "neutral")

# An independent list of emotion-naming words (stems as regexes), kept apart from the
# package's own list so that the ``has_keyword`` field is checked, not trusted.
# fmt: off
_KEYWORD_PATTERNS = [
    # anger
    r"ang(er|ers|ered|ry|rier|rily)", r"fur(y|ious|iously)", r"mad(der)?", r"annoy\w*",
    r"irritat\w*", r"outrag\w*", r"enrag\w*", r"livid", r"frustrat\w*", r"resent\w*",
    r"irate", r"rag(e|ing)", r"fum(e|es|ing)", r"infuriat\w*", r"hostil\w*", r"seeth\w*",
    # sadness
    r"sad(ly|der|dest|ness)?", r"unhapp\w*", r"heartbr\w*", r"depress\w*", r"miser\w*",
    r"sorrow\w*", r"gloom\w*", r"griev\w*", r"grief", r"devastat\w*", r"despair\w*",
    r"crushed", r"tear(ful|s)", r"cr(y|ied|ies|ying)", r"we(ep|eping|pt)", r"lonel\w*",
    r"hopeless\w*", r"upset", r"mourn\w*", r"melanchol\w*",
    # happiness
    r"happ(y|ier|iest|ily|iness)", r"glad(ly)?", r"joy\w*", r"delight\w*", r"thrill\w*",
    r"cheerful\w*", r"elat\w*", r"overjoy\w*", r"ecsta\w*", r"content(ed|ment)?",
    r"pleased", r"excit\w*", r"grat(eful|itude)", r"wonderful", r"lov(e|ed|ely|ing)",
    r"thankful", r"yay", r"hooray",
    # fear
    r"afraid", r"fear\w*", r"scar(e|ed|es|y)", r"fright\w*", r"terrif\w*", r"terror",
    r"anxi\w*", r"nervous\w*", r"worr\w*", r"panic\w*", r"dread\w*", r"horrif\w*",
    r"horror", r"alarm(ed|ing)", r"uneasy", r"apprehensi\w*", r"petrified", r"creepy",
    # surprise
    r"surpris\w*", r"shock\w*", r"amaz\w*", r"astonish\w*", r"stun\w*", r"startl\w*",
    r"astound\w*", r"speechless", r"unexpected\w*", r"wow", r"whoa", r"dumbfound\w*",
    r"flabbergast\w*", r"bewilder\w*", r"incredibl\w*", r"unbelievabl\w*",
    r"can'?t believe",
    # disgust
    r"disgust\w*", r"revolt\w*", r"repuls\w*", r"sicken\w*", r"nause\w*", r"gross(ed)?",
    r"repel\w*", r"appall\w*", r"vile", r"nasty", r"repugnant", r"loath\w*", r"yuck\w*",
    r"ew+", r"icky", r"foul",
]
# fmt: on
_KEYWORD_RE = re.compile(r"\b(?:" + "|".join(_KEYWORD_PATTERNS) + r")\b", re.IGNORECASE)
_FIRST_PERSON_RE = re.compile(r"\b(i|i'm|i've|i'd|i'll|me|my|mine|myself|we|our|us)\b", re.I)


def _has_keyword(text: str) -> bool:
    return _KEYWORD_RE.search(text) is not None


def _n_words(text: str) -> int:
    return len(re.findall(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?", text))


@pytest.fixture(scope="module")
def builtin() -> UtteranceSet:
    return load_utterances()


# --------------------------------------------------------------------------- builtin


def test_builtin_class_counts(builtin: UtteranceSet) -> None:
    counts = Counter(builtin.labels)
    assert set(counts) == set(CLASSES)
    assert builtin.classes == CLASSES
    assert all(counts[c] >= 60 for c in CLASSES), counts
    assert len(builtin) >= 420


def test_builtin_splits_stratified(builtin: UtteranceSet) -> None:
    assert set(builtin.splits) == {"train", "test"}
    for c in CLASSES:
        rows = builtin.filter(label=c)
        n_test = len(rows.filter(split="test"))
        n_train = len(rows.filter(split="train"))
        assert n_test > 0 and n_train > 0, c
        assert 0.2 <= n_test / len(rows) <= 0.4, (c, n_test, len(rows))
    train, test = load_utterances(split="train"), load_utterances(split="test")
    assert len(train) + len(test) == len(builtin)
    assert set(train.ids).isdisjoint(test.ids)
    assert {u.split for u in test} == {"test"}


def test_builtin_ids_and_texts_unique(builtin: UtteranceSet) -> None:
    assert len(set(builtin.ids)) == len(builtin)
    normalised = [" ".join(re.findall(r"[a-z0-9']+", t.lower())) for t in builtin.texts]
    assert len(set(normalised)) == len(builtin), [
        t for t, n in Counter(normalised).items() if n > 1
    ]


def test_builtin_schema_and_style(builtin: UtteranceSet) -> None:
    raw = [json.loads(line) for line in _builtin_lines()]
    assert len(raw) == len(builtin)
    for row in raw:
        assert set(row) == {"id", "text", "label", "group", "split", "has_keyword"}, row
        assert isinstance(row["has_keyword"], bool)
    for u in builtin:
        assert 6 <= _n_words(u.text) <= 25, u
        assert _FIRST_PERSON_RE.search(u.text), u
        assert u.text == u.text.strip() and u.group


def test_builtin_keyword_share(builtin: UtteranceSet) -> None:
    for c in EMOTIONS:
        texts = builtin.filter(label=c).texts
        without = sum(not _has_keyword(t) for t in texts) / len(texts)
        assert without >= 0.4, (c, without)
        # Some rows do name the emotion, so keyword and no-keyword probes can be compared.
        assert without < 1.0, c
    assert not any(_has_keyword(t) for t in builtin.filter(label="neutral").texts)


def test_builtin_keyword_field_matches_text(builtin: UtteranceSet) -> None:
    wrong = [
        (u.id, u.has_keyword, u.text) for u in builtin if u.has_keyword != _has_keyword(u.text)
    ]
    assert not wrong, wrong
    assert all(u.has_keyword == has_emotion_keyword(u.text) for u in builtin)


def test_builtin_groups_shared_and_spread(builtin: UtteranceSet) -> None:
    groups = set(builtin.groups)
    assert 8 <= len(groups) <= 12, groups
    for c in CLASSES:
        per_group = Counter(builtin.filter(label=c).groups)
        assert len(per_group) >= 8, (c, per_group)
        assert max(per_group.values()) <= 0.25 * sum(per_group.values()), (c, per_group)


def test_builtin_not_templated(builtin: UtteranceSet) -> None:
    for c in CLASSES:
        texts = builtin.filter(label=c).texts
        openings = Counter(" ".join(t.lower().split()[:3]) for t in texts)
        assert openings.most_common(1)[0][1] <= 4, (c, openings.most_common(3))
        assert len({t.lower().split()[0] for t in texts}) >= 10, c
        # Mixed sentence types: questions in every class, exclamations in emotional ones.
        assert sum("?" in t for t in texts) >= 2, c
        assert sum("!" in t for t in texts) >= (2 if c in EMOTIONS else 0), c
    assert not any("!" in t for t in builtin.filter(label="neutral").texts)


def test_builtin_hash_stable(builtin: UtteranceSet) -> None:
    h = builtin.content_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert load_utterances().content_hash() == h
    assert builtin[:10].content_hash() != h
    assert builtin.filter(split="test").content_hash() != h


def test_check_utterances_builtin() -> None:
    stats = check_utterances(min_per_class=60)
    assert stats.problems == ()
    assert stats.n == sum(stats.per_class.values())
    assert stats.per_split["train"] + stats.per_split["test"] == stats.n
    for c in EMOTIONS:
        assert stats.keyword_share[c] <= 0.6
    assert stats.keyword_share["neutral"] == 0.0
    table = stats.format()
    assert all(c in table for c in CLASSES)


# --------------------------------------------------------------------------- sequence API


def test_utterance_set_api(builtin: UtteranceSet) -> None:
    assert isinstance(builtin[0], Utterance)
    assert isinstance(builtin[:5], UtteranceSet) and len(builtin[:5]) == 5
    assert len(builtin.texts) == len(builtin.labels) == len(builtin.groups) == len(builtin)
    idx = builtin.label_indices()
    assert [builtin.classes[i] for i in idx] == builtin.labels
    sub = builtin.filter(split="test", label="fear", has_keyword=False)
    assert sub and all(u.label == "fear" and not u.has_keyword for u in sub)
    assert all(u.group == "pets" for u in builtin.filter(group="pets"))
    with pytest.raises(ValueError, match="split"):
        builtin.filter(split="dev")
    with pytest.raises(ValueError, match="split"):
        load_utterances(split="validation")
    with pytest.raises(AttributeError):
        builtin[0].text = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- user files


def _builtin_lines() -> list[str]:
    from emocircuits.data.utterances import builtin_path

    return [ln for ln in builtin_path().read_text(encoding="utf-8").splitlines() if ln.strip()]


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n",
        encoding="utf-8",
    )
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_load_jsonl_minimal(tmp_path: Path) -> None:
    rows = [
        {"text": f"I walked my dog along river path number {i}.", "label": "Neutral"}
        for i in range(10)
    ]
    rows += [{"text": "I'm so angry about the broken printer!", "label": "anger"}]
    path = _write_jsonl(tmp_path / "mine.jsonl", [*rows[:5], "", *rows[5:]])
    uset = load_utterances(path)
    assert len(uset) == 11
    assert uset.classes == ("anger", "neutral")
    assert uset.ids[0] == "neutral_000" and uset.ids[-1] == "anger_000"
    assert set(uset.groups) == {"ungrouped"}
    # Rows without a split get a deterministic stratified one.
    assert Counter(uset.filter(label="neutral").splits) == {"train": 7, "test": 3}
    assert load_utterances(str(path)).splits == uset.splits
    assert uset[-1].has_keyword and not uset[0].has_keyword
    assert len(load_utterances(path, split="test")) == 3


def test_load_jsonl_full_fields(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "full.jsonl",
        [
            {
                "id": "a1",
                "text": "My bus was late again.",
                "label": "anger",
                "group": "travel",
                "split": "test",
                "has_keyword": False,
            },
            {
                "id": "a2",
                "text": "I ate toast.",
                "label": "neutral",
                "group": "food",
                "split": "train",
                "has_keyword": "true",
            },
        ],
    )
    uset = load_utterances(path)
    assert uset[0] == Utterance("a1", "My bus was late again.", "anger", "travel", "test", False)
    assert uset[1].has_keyword is True and uset[1].split == "train"


def test_load_csv(tmp_path: Path) -> None:
    path = _write_csv(
        tmp_path / "mine.csv",
        ["Text", "label", "group", "split", "id"],
        [
            ["I found a spider in my shoe, ugh.", "disgust", "home", "train", "d1"],
            ["", "", "", "", ""],
            ["My train leaves at nine.", "neutral", "travel", "test", "n1"],
            ["Wait, you got me a cake?", "surprise", "", "", ""],
        ],
    )
    uset = load_utterances(path)
    assert uset.ids == ["d1", "n1", "surprise_000"]
    assert uset.groups == ["home", "travel", "ungrouped"]
    assert uset.splits[:2] == ["train", "test"]
    assert load_utterances(path, split="test").ids == ["n1"]


def test_load_csv_with_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_text("text,label\nI read the news every morning.,neutral\n", encoding="utf-8-sig")
    assert load_utterances(path).texts == ["I read the news every morning."]


# --------------------------------------------------------------------------- errors


def test_jsonl_missing_text_names_file_line_field(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "bad.jsonl",
        [{"text": "I cook on Sundays.", "label": "neutral"}, {"label": "anger"}],
    )
    with pytest.raises(ValueError) as err:
        load_utterances(path)
    msg = str(err.value)
    assert str(path) in msg and "line 2" in msg and "'text'" in msg


def test_jsonl_empty_label_names_line(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"text": "I cook on Sundays.", "label": "neutral"},
            "",
            {"text": "I lost my keys.", "label": "  "},
        ],
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: field 'label' is missing or empty"):
        load_utterances(path)


def test_jsonl_invalid_json(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "broken.jsonl",
        [{"text": "I cook on Sundays.", "label": "neutral"}, '{"text": "oops", "label": '],
    )
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 2: invalid JSON"):
        load_utterances(path)
    path2 = _write_jsonl(tmp_path / "list.jsonl", ['["I cook.", "neutral"]'])
    with pytest.raises(ValueError, match=r"list\.jsonl, line 1: expected a JSON object"):
        load_utterances(path2)


def test_invalid_split_and_keyword_values(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "split.jsonl", [{"text": "I cook.", "label": "neutral", "split": "dev"}]
    )
    with pytest.raises(ValueError, match=r"split\.jsonl, line 1: field 'split'"):
        load_utterances(path)
    path2 = _write_csv(
        tmp_path / "kw.csv", ["text", "label", "has_keyword"], [["I cook.", "neutral", "maybe"]]
    )
    with pytest.raises(ValueError, match=r"kw\.csv, row 1 \(line 2\): field 'has_keyword'"):
        load_utterances(path2)


def test_csv_missing_column(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "nolabel.csv", ["text", "group"], [["I cook.", "food"]])
    with pytest.raises(ValueError) as err:
        load_utterances(path)
    msg = str(err.value)
    assert str(path) in msg and "'label'" in msg and "header" in msg


def test_csv_empty_text_names_row_and_field(tmp_path: Path) -> None:
    path = _write_csv(
        tmp_path / "rows.csv",
        ["text", "label"],
        [["I cook on Sundays.", "neutral"], ["   ", "anger"]],
    )
    with pytest.raises(ValueError) as err:
        load_utterances(path)
    msg = str(err.value)
    assert str(path) in msg and "row 2" in msg and "line 3" in msg and "'text'" in msg


def test_duplicate_ids(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "dup.jsonl",
        [
            {"id": "x", "text": "I cook.", "label": "neutral"},
            {"id": "x", "text": "I swim.", "label": "neutral"},
        ],
    )
    with pytest.raises(ValueError, match=r"dup\.jsonl, line 2: field 'id' duplicates 'x'"):
        load_utterances(path)


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.txt.*unknown file extension '\.txt'"):
        load_utterances(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_utterances(tmp_path / "nope.jsonl")
    empty = _write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="no utterances"):
        load_utterances(empty)


def test_check_utterances_reports_problems(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "small.jsonl",
        [
            {"text": "I cook on Sundays.", "label": "neutral", "split": "train"},
            {"text": "I  cook on sundays.", "label": "neutral", "split": "train"},
            {"text": "I'm furious about the fee!", "label": "anger", "split": "test"},
        ],
    )
    stats = check_utterances(path, min_per_class=2)
    assert stats.per_class == {"anger": 1, "neutral": 2}
    assert stats.keyword_share == {"anger": 1.0, "neutral": 0.0}
    joined = " | ".join(stats.problems)
    assert "duplicate texts" in joined
    assert "'anger' has no train" in joined and "'neutral' has no test" in joined
    assert "'anger' has 1 rows" in joined
