"""Implicit-emotion story corpus: loader, checker, splits, word inflections, human VA."""

from __future__ import annotations

import collections
import dataclasses
import json
import re

import pytest

from emocircuits.data import stories as st
from emocircuits.data.stories import (
    HUMAN_VA,
    HUMAN_VA_LEMMAS,
    HUMAN_VA_SCALE,
    HUMAN_VA_SOURCE,
    STORY_EMOTION_WORDS,
    STORY_EMOTIONS,
    Story,
    StoryFormatError,
    check_stories,
    emotion_word_forms,
    find_emotion_words,
    human_va_unit,
    inflections,
    load_stories,
    story_splits,
    topic_splits,
)
from emocircuits.emotions import EKMAN6, EMOTION_WORDS, NEUTRAL


@pytest.fixture(scope="module")
def corpus() -> list[Story]:
    return load_stories()


def _stories(corpus):
    return [s for s in corpus if s.emotion != NEUTRAL]


# ----------------------------------------------------------------------------- corpus


def test_builtin_corpus_loads(corpus):
    assert len(corpus) >= 20 * 30 + 200
    s = corpus[0]
    assert isinstance(s, Story)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.text = "x"  # type: ignore[misc]
    assert set(s.to_dict()) == set(st.REQUIRED_FIELDS)
    assert len({x.id for x in corpus}) == len(corpus)
    assert len({x.text for x in corpus}) == len(corpus), "duplicate texts"
    assert {x.person for x in corpus} == set(st.PERSONS)
    assert {x.emotion for x in corpus} == set(STORY_EMOTIONS) | {NEUTRAL}


def test_corpus_counts(corpus):
    assert len(STORY_EMOTIONS) >= 20 and len(set(STORY_EMOTIONS)) == len(STORY_EMOTIONS)
    assert STORY_EMOTIONS[:6] == EKMAN6
    by = collections.defaultdict(list)
    for s in corpus:
        by[s.emotion].append(s)
    for e in STORY_EMOTIONS:
        assert len(by[e]) >= 30, e
        assert len({s.topic for s in by[e]}) >= 6, e
    assert len(by[NEUTRAL]) >= 200
    topics = {s.topic for s in corpus}
    assert len(topics) >= 10
    assert {s.topic for s in by[NEUTRAL]} == topics


def test_person_balance(corpus):
    for e in STORY_EMOTIONS:
        rows = [s for s in corpus if s.emotion == e]
        share = sum(s.person == "first" for s in rows) / len(rows)
        assert 0.35 <= share <= 0.65, (e, share)
    stories = _stories(corpus)
    share = sum(s.person == "first" for s in stories) / len(stories)
    assert 0.4 <= share <= 0.6
    neutral = [s for s in corpus if s.emotion == NEUTRAL]
    assert 0.3 <= sum(s.person == "first" for s in neutral) / len(neutral) <= 0.7


def test_person_field_matches_text(corpus):
    for s in corpus:
        narration = re.sub(r'"[^"]*"', " ", s.text)          # dialogue does not count
        has_first = bool(re.search(r"\bI\b|\bI'", narration)) or bool(
            re.search(r"\b(me|my|mine|myself|we|our|ours|us)\b", narration, re.IGNORECASE))
        assert has_first == (s.person == "first"), (s.id, s.person, s.text)


_SENTENCE_END = re.compile(r'[.!?]+"?(?=\s|$)')


def test_story_lengths(corpus):
    for s in corpus:
        n = len(_SENTENCE_END.findall(s.text))
        lo = 1 if s.emotion == NEUTRAL else 2
        assert lo <= n <= 5, (s.id, n, s.text)


def test_corpus_passes_its_checker(corpus):
    assert check_stories(corpus) == []


def test_stories_never_name_their_own_emotion(corpus):
    for s in _stories(corpus):
        assert find_emotion_words(s.text, STORY_EMOTION_WORDS[s.emotion]) == [], s.id


# ----------------------------------------------------------------------------- word lists


def test_word_lists_cover_every_concept():
    assert list(STORY_EMOTION_WORDS) == list(STORY_EMOTIONS)
    for e in EKMAN6:
        assert STORY_EMOTION_WORDS[e] == EMOTION_WORDS[e]
    for e, words in STORY_EMOTION_WORDS.items():
        assert e in words, f"{e!r} missing from its own word list"
        assert words and all(w == w.lower().strip() and w for w in words), e
    assert st.GENERAL_AFFECT_WORDS, "general affect words"


@pytest.mark.parametrize("word, forms", [
    ("angry", {"angrily", "angrier", "angriest"}),
    ("sad", {"sadly", "sadder", "saddest", "sadness", "sadden", "saddened", "saddening"}),
    ("terrified", {"terrify", "terrifies", "terrifying", "terrifyingly"}),
    ("disgust", {"disgusts", "disgusted", "disgusting", "disgustingly"}),
    ("scared", {"scare", "scares", "scaring"}),
    ("hope", {"hopes", "hoped", "hoping", "hopeful", "hopefully"}),
    ("fear", {"fears", "feared", "fearing", "fearful", "fearfully"}),
    ("regret", {"regrets", "regretted", "regretting", "regretful"}),
    ("envy", {"envies", "envied", "envying"}),
    ("panicked", {"panic", "panics", "panicking"}),
    ("stunned", {"stun", "stuns", "stunning"}),
    ("thrilled", {"thrill", "thrills", "thrilling"}),
    ("loathing", {"loathe", "loathes", "loathed"}),
    ("worried", {"worry", "worries", "worrying"}),
    ("happy", {"happier", "happiest", "happily", "happiness"}),
    ("incredible", {"incredibly"}),
    ("ecstatic", {"ecstatically"}),
    ("jealousy", {"jealousies"}),
    ("lonely", {"lonelier", "loneliest", "loneliness"}),
    ("calm", {"calmly", "calmer", "calmed", "calming", "calmness"}),
    ("pleased", {"please", "pleases", "pleasing"}),
])
def test_inflections_generate(word, forms):
    got = inflections(word)
    assert word in got
    assert forms <= got, forms - got


@pytest.mark.parametrize("word, not_forms", [
    ("scared", {"scar", "scars"}),         # the e-drop stem is not the verb
    ("hated", {"hat", "hats"}),
    ("amused", {"amus"}),
    ("glad", {"glade"}),
    ("mad", {"madam", "made"}),
])
def test_inflections_do_not_overreach(word, not_forms):
    assert not (not_forms & inflections(word))


def test_word_forms_map_back_to_their_roots():
    forms = emotion_word_forms()
    assert forms["angrily"] == "angry"
    assert forms["terrifying"] in {"terrified", "terrifying"}
    assert forms["saddened"] == "sad"
    assert emotion_word_forms(["calm"]).keys() == inflections("calm")


# ----------------------------------------------------------------------------- checker


_PLANTED = [
    ("Angrily,", "angrily"),
    ("saddened.", "saddened"),
    ("(terrifying)", "terrifying"),
    ('"Disgusts"', "disgusts"),
    ("feared", "feared"),
    ("HOPING", "hoping"),
    ("Jealousy's", "jealousy"),
    ("regretted;", "regretted"),
    ("lonelier", "lonelier"),
    ("calmly", "calmly"),
    ("envied", "envied"),
    ("panicking!", "panicking"),
    ("embarrassing", "embarrassing"),
    ("proudly", "proudly"),
    ("Heartbroken", "heartbroken"),
]


@pytest.mark.parametrize("planted, word", _PLANTED)
def test_checker_finds_planted_words(corpus, planted, word):
    story = _stories(corpus)[len(planted) * 7 % 600]
    words = story.text.split()
    words.insert(len(words) // 2, planted)
    doctored = dataclasses.replace(story, text=" ".join(words))
    assert find_emotion_words(doctored.text) == [word]
    assert check_stories([story, doctored]) == [(story.id, [word])]


def test_checker_reports_every_word_once_in_order():
    text = "She was furious, then Furious again, and afraid; the joy of it."
    assert find_emotion_words(text) == ["furious", "afraid", "joy"]


@pytest.mark.parametrize("innocent", [
    "glade", "madam", "Madrid", "fondue", "scarlet", "Sadie", "contention", "Grossman",
    "Joyce", "hat", "scar", "scarf", "hopscotch", "feather", "tears", "cried", "laughed",
    "smiled", "alone", "bedroom", "Sorrento", "Prideaux", "Lovell",
])
def test_checker_ignores_innocent_words(innocent):
    assert find_emotion_words(f"They walked past the {innocent} at noon.") == []


def test_checker_with_custom_words_and_phrases():
    assert find_emotion_words("The dog barked loudly.", ["bark"]) == ["barked"]
    assert find_emotion_words("He felt blue today.", {"sadness": ["blue"]}) == ["blue"]
    assert find_emotion_words("He felt blue today.", ["sad"]) == []
    assert find_emotion_words("She was over the moon.", ["over the moon"]) == ["over the moon"]
    assert find_emotion_words("He jumped over the moonbeam.", ["over the moon"]) == []


# ----------------------------------------------------------------------------- splits


def test_splits_are_by_topic_disjoint_and_complete(corpus):
    sp = story_splits(corpus)
    assert list(sp) == list(st.SPLITS)
    ids = [s.id for part in sp.values() for s in part]
    assert sorted(ids) == sorted(s.id for s in corpus)
    assert len(ids) == len(set(ids))
    topic_of = {}
    for name, part in sp.items():
        for s in part:
            assert topic_of.setdefault(s.topic, name) == name, f"topic {s.topic} split"
    assert topic_of == topic_splits(corpus)
    for name, part in sp.items():
        assert {s.emotion for s in part} == set(STORY_EMOTIONS) | {NEUTRAL}, name
        order = [corpus.index(s) for s in part]
        assert order == sorted(order), "input order kept"
    n = len(corpus)
    assert 0.5 <= len(sp["train"]) / n <= 0.7
    assert 0.12 <= len(sp["validation"]) / n <= 0.3
    assert 0.12 <= len(sp["test"]) / n <= 0.3


def test_splits_are_deterministic(corpus):
    a = topic_splits(corpus, seed=3)
    assert topic_splits(list(corpus), seed=3) == a
    assert topic_splits(list(reversed(corpus)), seed=3) == a
    assert {k: [s.id for s in v] for k, v in story_splits(corpus).items()} == \
        {k: [s.id for s in v] for k, v in story_splits(corpus).items()}


def test_load_stories_split_and_emotion_filters(corpus):
    test = load_stories(split="test")
    assert [s.id for s in test] == [s.id for s in story_splits(corpus)["test"]]
    fear = load_stories(emotions=["fear"], split="test")
    assert fear and all(s.emotion == "fear" for s in fear)
    assert {s.id for s in fear} <= {s.id for s in test}
    both = load_stories(emotions=("calm", NEUTRAL))
    assert {s.emotion for s in both} == {"calm", NEUTRAL}
    assert load_stories(emotions="love") == [s for s in corpus if s.emotion == "love"]
    with pytest.raises(ValueError, match="unknown emotion"):
        load_stories(emotions=["anger", "angst"])
    with pytest.raises(ValueError, match="split"):
        load_stories(split="dev")


def _mk(i, emotion, topic):
    return Story(id=f"s{i}", emotion=emotion, person="third", topic=topic, text="x. y.")


def test_split_raises_when_an_emotion_cannot_be_in_every_split():
    rows = [_mk(i, "fear", t) for i, t in enumerate("abcd")]
    rows += [_mk(10, "calm", "a"), _mk(11, "calm", "b")]
    with pytest.raises(ValueError, match="'calm'"):
        story_splits(rows)


def test_split_argument_errors(corpus):
    with pytest.raises(ValueError, match="at least 3 topics"):
        story_splits([_mk(0, "fear", "a"), _mk(1, "fear", "b")])
    with pytest.raises(ValueError, match="sum to 1"):
        story_splits(corpus, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="positive"):
        story_splits(corpus, fractions=(0.8, 0.2))
    with pytest.raises(ValueError, match="no stories"):
        story_splits([])


# ----------------------------------------------------------------------------- bad rows


def test_bad_rows_name_file_line_and_field(tmp_path):
    good = {"id": "a1", "emotion": "fear", "person": "first", "topic": "work",
            "text": "I froze. My hands shook."}
    lines = [
        json.dumps(good),                                            # 1 ok
        '{"id": "a2", "emotion": "fear",',                           # 2 invalid JSON
        json.dumps({k: v for k, v in {**good, "id": "a3"}.items() if k != "text"}),  # 3
        json.dumps({**good, "id": "a4", "person": "second"}),        # 4 bad person
        json.dumps({**good}),                                        # 5 duplicate id
        json.dumps({**good, "id": "a6", "topic": 7}),                # 6 non-string topic
        json.dumps({**good, "id": "a7", "emotion": "angst"}),        # 7 unknown emotion
        "",                                                          # 8 blank: skipped
        json.dumps([1, 2]),                                          # 9 not an object
        json.dumps({**good, "id": "a10", "text": "   "}),            # 10 empty text
        json.dumps({**good, "id": "a11", "extra": 1}),               # 11 ok, extra ignored
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(StoryFormatError) as info:
        load_stories(path)
    err = info.value
    got = {(p.line, p.field) for p in err.problems}
    assert got == {(2, "<json>"), (3, "text"), (4, "person"), (5, "id"), (6, "topic"),
                   (7, "emotion"), (9, "<row>"), (10, "text")}
    msg = str(err)
    assert str(path) in msg
    for needle in (f"{path}:2: <json>", f"{path}:3: text: missing", f"{path}:4: person",
                   f"{path}:5: id: duplicate id 'a1' (first used on line 1)",
                   f"{path}:6: topic: must be a string", f"{path}:7: emotion: unknown",
                   f"{path}:10: text: must not be empty"):
        assert needle in msg, needle
    ok = tmp_path / "ok.jsonl"
    ok.write_text(lines[0] + "\n\n" + lines[10] + "\n")
    assert [s.id for s in load_stories(ok)] == ["a1", "a11"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_stories(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- human VA


def test_human_va_covers_every_concept_within_scale():
    lo, hi = HUMAN_VA_SCALE
    assert (lo, hi) == (1.0, 9.0)
    assert set(HUMAN_VA) == set(STORY_EMOTIONS) == set(HUMAN_VA_LEMMAS)
    for e, (v, a) in HUMAN_VA.items():
        assert lo <= v <= hi and lo <= a <= hi, e
    assert "Warriner" in HUMAN_VA_SOURCE and "2013" in HUMAN_VA_SOURCE
    unit = human_va_unit()
    assert set(unit) == set(HUMAN_VA)
    assert all(-1 <= v <= 1 and -1 <= a <= 1 for v, a in unit.values())
    assert unit["calm"] == pytest.approx(((6.89 - 5) / 4, (1.67 - 5) / 4))


def test_human_va_is_plausible():
    v = {e: va[0] for e, va in HUMAN_VA.items()}
    a = {e: va[1] for e, va in HUMAN_VA.items()}
    negative = ("anger", "sadness", "fear", "disgust", "boredom", "loneliness", "shame",
                "guilt", "jealousy")
    assert all(v[e] < 5 for e in negative)
    assert all(v[e] > 5 for e in set(STORY_EMOTIONS) - set(negative))
    assert a["calm"] < a["contentment"] < a["excitement"]
    assert a["boredom"] < a["anger"] and a["sadness"] < a["fear"]
