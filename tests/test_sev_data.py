"""SEV data layer: loader, validator, writer, builtin dataset and the emotion-word checker."""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emocircuits.data import (
    VALENCES,
    SEVDataset,
    SEVRecord,
    SEVValidationError,
    check_no_emotion_words,
    load_sev,
    save_sev,
    validate_sev,
)
from emocircuits.data.sev import THEMES, parse_sev_text

REFERENCE = Path(__file__).parents[2] / "shared/data/sev_reference/sev.jsonl"
SPLIT_SIZES = {"train": 160, "validation": 40, "test": 40}


def _row(sid: str = "work_000", **over: object) -> dict:
    row: dict = {
        "skeleton_id": sid,
        "theme": "Work/Job",
        "scenario": "I sent the weekly report to my manager this morning.",
        "event": {
            "positive": "My manager approved it at once.",
            "neutral": "My manager filed it for Friday.",
            "negative": "My manager sent it back with many corrections.",
        },
    }
    row.update(over)
    return row


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------ reference file


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference SEV file not available")
def test_reference_loads_unchanged() -> None:
    ds = load_sev(REFERENCE)
    assert len(ds) == 160
    assert len(ds.themes()) == 8
    assert set(Counter(r.theme for r in ds).values()) == {20}
    raw = [json.loads(line) for line in REFERENCE.read_text(encoding="utf-8").splitlines() if line]
    assert [r.to_dict() for r in ds] == raw
    assert validate_sev(REFERENCE) == []


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference SEV file not available")
def test_reference_known_emotion_word_leaks() -> None:
    hits = check_no_emotion_words(load_sev(REFERENCE))
    surprised = [h for h in hits if h.word == "surprised"]
    assert sorted(h.skeleton_id for h in surprised) == ["health_02", "school_09"]
    assert all(h.field == "event.positive" for h in surprised)


# ------------------------------------------------------------------ builtin dataset


def test_builtin_split_sizes_and_stratification() -> None:
    all_ids: list[str] = []
    for split, size in SPLIT_SIZES.items():
        ds = load_sev(f"builtin:{split}")
        assert isinstance(ds, SEVDataset)
        assert len(ds) == size
        assert all(r.split == split for r in ds)
        per_theme = Counter(r.theme for r in ds)
        assert set(per_theme) == set(THEMES.values())
        assert set(per_theme.values()) == {size // 8}
        all_ids += [r.skeleton_id for r in ds]
    assert len(all_ids) == len(set(all_ids)) == 240  # disjoint, and together they are all


def test_builtin_all_themes_ids_and_uniqueness() -> None:
    ds = load_sev("builtin:all")
    assert len(ds) >= 240
    counts = Counter(r.theme for r in ds)
    assert set(counts) == set(THEMES.values())
    assert min(counts.values()) >= 30
    for r in ds:
        prefix, _, num = r.skeleton_id.rpartition("_")
        assert THEMES[prefix] == r.theme and re.fullmatch(r"\d{3}", num)
    scenarios = [r.scenario for r in ds]
    assert len(set(scenarios)) == len(scenarios)
    events = [e for r in ds for _, e in r.pairs()]
    assert len(set(events)) == len(events)


def test_builtin_style() -> None:
    for r in load_sev("builtin:all"):
        assert 10 <= len(r.scenario.split()) <= 18, r.skeleton_id
        assert re.search(r"\b(I|[Mm]y|me|[Oo]ur|[Ww]e|us)\b", r.scenario), r.skeleton_id
        for v, e in r.pairs():
            assert 10 <= len(e.split()) <= 20, (r.skeleton_id, v)
            assert e.endswith(".") and e.count(". ") == 0, (r.skeleton_id, v)


@pytest.mark.skipif(not REFERENCE.exists(), reason="reference SEV file not available")
def test_builtin_shares_no_text_with_reference() -> None:
    ref = load_sev(REFERENCE)
    ref_text = {r.scenario for r in ref} | {e for r in ref for _, e in r.pairs()}
    ours = load_sev("builtin:all")
    assert not ref_text & ({r.scenario for r in ours} | {e for r in ours for _, e in r.pairs()})


def test_builtin_has_no_emotion_words() -> None:
    hits = check_no_emotion_words(load_sev("builtin:all"))
    assert hits == [], "\n".join(map(str, hits))


def test_unknown_builtin_split() -> None:
    with pytest.raises(ValueError, match="builtin:train"):
        load_sev("builtin:dev")


# ------------------------------------------------------------------ checker


@pytest.mark.parametrize(
    "text, word",
    [
        ("My manager was angry about the report.", "angry"),
        ("My manager answered angrily on the phone.", "angrily"),
        ("The clerk looked SURPRISED at my form.", "surprised"),
        ("The result was surprisingly quick.", "surprisingly"),
        ("The nurse sounded worried on the call.", "worried"),
        ("It brought me great happiness to sign.", "happiness"),
        ("The team leader was in a rage all week.", "rage"),
        ("The director seemed pleasantly surprised by it.", "pleasantly"),
    ],
)
def test_checker_catches_planted_words(text: str, word: str) -> None:
    bad = SEVRecord.from_dict(_row(event={"positive": text, "neutral": "x.", "negative": "y."}))
    hits = check_no_emotion_words([bad])
    assert word in {h.word for h in hits}
    assert all(h.field == "event.positive" and h.skeleton_id == "work_000" for h in hits)


def test_checker_whole_words_only() -> None:
    rec = SEVRecord.from_dict(_row(scenario="I moved the storage boxes to Madrid on a sadder-free madam day."))
    # "storage" contains "rage", "Madrid"/"madam" contain "mad": no hit; "sadder" is an inflection of "sad".
    assert [h.word for h in check_no_emotion_words([rec])] == ["sadder"]


def test_checker_custom_vocabulary() -> None:
    rec = SEVRecord.from_dict(_row(scenario="I filed the weekly report on time."))
    assert check_no_emotion_words([rec], words=["report"])[0].root == "report"
    assert check_no_emotion_words([rec], words=["on time"])[0].word == "on time"


# ------------------------------------------------------------------ validator


def test_validator_reports_every_problem_with_location(tmp_path: Path) -> None:
    lines = [
        json.dumps(_row("work_000")),                                   # 1 ok
        "{not json",                                                    # 2 invalid JSON
        "[1, 2, 3]",                                                    # 3 not an object
        json.dumps({k: v for k, v in _row("work_003").items() if k != "theme"}),  # 4 missing
        json.dumps(_row("work_004", scenario="   ")),                   # 5 empty
        json.dumps(_row("work_005", scenario=7)),                       # 6 non-string
        json.dumps(_row("work_006", event=["a", "b", "c"])),            # 7 event not a dict
        json.dumps(_row("work_007", event={**_row()["event"], "mixed": "z."})),  # 8 unknown key
        json.dumps(_row("work_008", event={"positive": "a.", "neutral": "b."})),  # 9 missing key
        "",                                                             # 10 blank: skipped
        json.dumps(_row("work_000")),                                   # 11 duplicate id
        '{"skeleton_id": "a", "skeleton_id": "b"}',                     # 12 repeated key
        json.dumps(_row("work_013", score=float("nan"))),               # 13 NaN is not JSON
    ]
    path = _write(tmp_path / "bad.jsonl", lines)
    problems = validate_sev(path)
    got = {(p.line, p.field) for p in problems}
    assert got == {
        (2, "<line>"),
        (3, "<record>"),
        (4, "theme"),
        (5, "scenario"),
        (6, "scenario"),
        (7, "event"),
        (8, "event.mixed"),
        (9, "event.negative"),
        (11, "skeleton_id"),
        (12, "skeleton_id"),
        (13, "<line>"),
    }
    assert all(p.file == str(path) for p in problems)
    by_line = {p.line: p.message for p in problems}
    assert "invalid JSON" in by_line[2]
    assert "object" in by_line[3]
    assert by_line[4] == "missing"
    assert "empty" in by_line[5]
    assert "string" in by_line[6]
    assert "unknown valence" in by_line[8]
    assert "line 1" in by_line[11]

    with pytest.raises(SEVValidationError) as info:
        load_sev(path)
    assert isinstance(info.value, ValueError)
    assert len(info.value.problems) == len(problems)
    message = str(info.value)
    for p in problems:
        assert f"{path}:{p.line}: {p.field}: " in message


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.jsonl", ["", json.dumps(_row("a_0")), "   ", "", json.dumps(_row("a_1"))])
    assert [r.skeleton_id for r in load_sev(path)] == ["a_0", "a_1"]
    _write(path, ["", "", json.dumps(_row("a_0", theme=""))])
    assert [(p.line, p.field) for p in validate_sev(path)] == [(3, "theme")]


def test_empty_file_and_bad_utf8(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(SEVValidationError, match="no records"):
        load_sev(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(_row()).encode() + b"\n\xff\xfe\n")
    assert [(p.line, "UTF-8" in p.message) for p in validate_sev(bad)] == [(2, True)]


def test_record_constructor_validates() -> None:
    with pytest.raises(SEVValidationError):
        SEVRecord("x", "t", "s", {"positive": "a", "neutral": "b"})
    with pytest.raises(SEVValidationError):
        SEVRecord("x", "t", "", {v: v for v in VALENCES})
    with pytest.raises(SEVValidationError, match="plain JSON"):
        SEVRecord("x", "t", "s", {v: v for v in VALENCES}, extra={"o": object()})
    with pytest.raises(SEVValidationError, match="core field"):
        SEVRecord("x", "t", "s", {v: v for v in VALENCES}, extra={"theme": "t2"})
    rec = SEVRecord("x", "t", "s", {"negative": "c", "positive": "a", "neutral": "b"})
    assert list(rec.event) == list(VALENCES)
    assert rec.event_for("neutral") == "b"


# ------------------------------------------------------------------ save / round trip


def test_extra_fields_survive_round_trip(tmp_path: Path) -> None:
    rows = [
        _row("work_000", split="train", source={"author": "me", "tags": ["a", 1]}, note="ü ✓"),
        _row("work_001", split="test"),
    ]
    src = _write(tmp_path / "in.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows])
    first = load_sev(src)
    assert first[0].extra == {"split": "train", "source": {"author": "me", "tags": ["a", 1]},
                              "note": "ü ✓"}
    out = save_sev(first, tmp_path / "sub" / "out.jsonl")
    again = load_sev(out)
    assert [r.to_dict() for r in again] == rows
    assert again == first
    assert again.content_hash() == first.content_hash()
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]  # no temp file left


def test_content_hash_ignores_layout_but_not_content(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.jsonl", [json.dumps(_row())])
    row = _row()
    reordered = {k: row[k] for k in reversed(list(row))}
    b = _write(tmp_path / "b.jsonl", ["", json.dumps(reordered, indent=None, separators=(",", ":"))])
    c = _write(tmp_path / "c.jsonl", [json.dumps(_row(scenario="I sent a different report."))])
    assert load_sev(a).content_hash() == load_sev(b).content_hash()
    assert load_sev(a).content_hash() != load_sev(c).content_hash()
    assert load_sev("builtin:train").content_hash() != load_sev("builtin:test").content_hash()


def test_save_refuses_duplicates_and_keeps_old_file(tmp_path: Path) -> None:
    target = _write(tmp_path / "t.jsonl", [json.dumps(_row())])
    before = target.read_text(encoding="utf-8")
    rec = SEVRecord.from_dict(_row())
    with pytest.raises(SEVValidationError, match="duplicate"):
        save_sev([rec, rec], target)
    assert target.read_text(encoding="utf-8") == before


def test_dataset_sequence_api() -> None:
    ds = load_sev("builtin:validation")
    assert ds.name == "builtin:validation"
    assert isinstance(ds[0], SEVRecord)
    assert len(ds[:3]) == 3 and isinstance(ds[:3], SEVDataset)
    assert ds.get(ds[1].skeleton_id) == ds[1]
    assert sum(len(v) for v in ds.by_theme().values()) == len(ds)
    assert ds == list(ds.records)


# ------------------------------------------------------------------ fuzz

_json_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12,
)
_field_value = st.one_of(st.text(max_size=15), _json)
_event = st.one_of(
    st.fixed_dictionaries({v: _field_value for v in VALENCES}),
    st.dictionaries(st.sampled_from([*VALENCES, "mixed", ""]), _field_value, max_size=4),
    _json,
)
_recordish = st.fixed_dictionaries(
    {},
    optional={
        "skeleton_id": st.one_of(st.sampled_from(["a", "b", "c"]), _field_value),
        "theme": _field_value,
        "scenario": _field_value,
        "event": _event,
        "split": _json,
        "extra": _json,
    },
)
_line = st.one_of(
    _recordish.map(json.dumps),
    _json.map(json.dumps),
    st.text(max_size=40),
    st.just(json.dumps(_row("a"))),
    st.sampled_from(["", "   ", "{", "[[[", "NaN", '{"a":1,"a":2}', "[" * 5000]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(_line, max_size=8).map(lambda ls: "\n".join(ls).encode("utf-8",
                                                                                  "surrogatepass")),
                 st.binary(max_size=200)))
def test_fuzz_load_either_loads_or_raises_validation_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_bytes(data)
        try:
            ds = load_sev(path)
        except SEVValidationError as exc:
            assert exc.problems
            assert exc.problems == validate_sev(path)
            return
        assert validate_sev(path) == []
        assert len(ds) >= 1
        out = save_sev(ds, Path(tmp) / "out.jsonl")
        assert load_sev(out) == ds


def test_parse_text_accepts_str_and_bom() -> None:
    text = "\ufeff" + json.dumps(_row()) + "\n"
    records, problems = parse_sev_text(text, file="mem")
    assert problems == [] and records[0].skeleton_id == "work_000"
