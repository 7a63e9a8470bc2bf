"""Prompt-based emotion elicitation (paper stage 01), its judging, and the readout beside it.

Templates, generation settings, judging, accuracy tables and the record layout are the
paper's stage 01 (stage page: docs/stages/prompting.md).

* ``elicit``: greedy generation for every (scenario, valence, emotion) with the
  emotion-instructed template (system ``"Always reply in {emotion}.\\nKeep the reply to at
  most two sentences."``, user ``"{scenario}\\n{event}"``), written to JSONL in the paper's
  record layout as it goes, one fsync per batch; an interrupted run resumes.
* ``judge_generations`` + ``prompting_table``: accuracy = accepted / total, overall, per
  emotion, per valence and per emotion × valence (the paper's 01/3 numbers).
* ``readout_accuracy``: for the same instructed prompts followed by an assistant prefix
  (``"I feel"`` for chat models, ``"I felt"`` after the plain rendering for base models),
  is argmax_e P(e) == target, where P(e) is the next-token mass of emotion e's words?

Caveat (a known flaw, see the method page, docs/method.md): an instructed prompt contains
the target emotion's name, so the readout on it is partly the model copying the keyword.
``readout_accuracy`` therefore also reports the same accuracy with the instruction word's
own first token taken out of its emotion's token set (``table_no_keyword``), and the readout
on NEUTRAL prompts (no instruction) per valence as the no-instruction reference.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float

from .emotions import EKMAN6, EmotionSet, emotion_set
from .evaluate import AccuracyTable, accuracy_table
from .generation import GenerationConfig, generate
from .judges.readout import TOKEN_FORMS, emotion_tokens, last_token_logits, readout_from_logits
from .models import is_chat_model, model_id
from .progress import tqdm
from .prompts import (
    EMOTION_TEMPLATE,
    NEUTRAL_TEMPLATE,
    PromptTemplate,
    emotion_prompts,
    neutral_prompts,
)
from .results import Result, atomic_write_text, summarize

VALENCES: tuple[str, ...] = ("positive", "neutral", "negative")
RECORD_FIELDS: tuple[str, ...] = (
    "key", "skeleton_id", "theme", "valence", "emotion", "scenario", "event", "gen_text", "meta")
# meta fields that must agree between an existing file and a resumed run
_RESUME_CHECK = ("model_id", "dtype", "max_new_tokens", "min_new_tokens", "repetition_penalty",
                 "no_repeat_ngram_size", "chat", "assistant_prefix", "template")


class ElicitationFileError(ValueError):
    """A generations file that can not be read or resumed (names the file and line)."""


def record_key(skeleton_id: str, valence: str, emotion: str) -> str:
    """The paper's row key ``{skeleton_id}__{valence}__{emotion}``."""
    return f"{skeleton_id}__{valence}__{emotion}"


def default_assistant_prefix(model, chat: bool | None = None) -> str:
    """``"I feel"`` after a chat template; ``"I felt"`` after the plain (base-model) rendering."""
    use_chat = is_chat_model(model) if chat is None else chat
    return "I feel" if use_chat else "I felt"


# ------------------------------------------------------------------------------ files


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_jsonl_atomic(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSONL to ``path`` atomically (``results.atomic_write_text``, fsynced)."""
    path = Path(path)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(path, text, fsync=True)
    _fsync_dir(path.parent)
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write one JSON document atomically (``results.atomic_write_text``, fsynced)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", fsync=True)


def _read_rows(path: Path) -> tuple[list[dict], bool]:
    """Rows of a generations file and whether it needs rewriting (truncated tail, duplicates).

    A last line that is cut off (no newline and not valid JSON, or not a complete record)
    is dropped: that is what a killed writer leaves. A bad line anywhere else is an error.
    """
    raw = path.read_bytes()
    if not raw:
        return [], False
    lines = raw.split(b"\n")
    complete_tail = raw.endswith(b"\n")
    if complete_tail:
        lines = lines[:-1]
    rows: list[dict] = []
    seen: set[str] = set()
    dirty = not complete_tail
    for i, line in enumerate(lines, start=1):
        last = i == len(lines)
        if not line.strip():
            dirty = True
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
            missing = [k for k in RECORD_FIELDS if k not in obj] if isinstance(obj, dict) else ["*"]
            if missing:
                raise ElicitationFileError(f"missing fields {missing}")
        except (ValueError, UnicodeDecodeError) as e:
            if last:
                warnings.warn(f"{path}:{i}: dropping a truncated last line ({len(line)} bytes)",
                              stacklevel=3)
                dirty = True
                continue
            raise ElicitationFileError(f"{path}:{i}: not a generation record: {e}") from None
        if obj["key"] in seen:
            warnings.warn(f"{path}:{i}: duplicate key {obj['key']!r}; keeping the first", stacklevel=3)
            dirty = True
            continue
        seen.add(obj["key"])
        rows.append(obj)
    return rows, dirty


def load_generations(path: str | os.PathLike, *, strict: bool = True) -> list[dict]:
    """Read a generations JSONL (the paper's record layout), in file order.

    ``strict=False`` tolerates (drops, with a warning) a truncated last line; a bad line
    elsewhere always raises ``ElicitationFileError`` with file and line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_generations: no file {path}")
    if strict:
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise ElicitationFileError(f"{path}:{i}: invalid JSON ({e})") from None
                missing = [k for k in RECORD_FIELDS if k not in obj]
                if missing:
                    raise ElicitationFileError(f"{path}:{i}: record lacks fields {missing}")
                rows.append(obj)
        return rows
    return _read_rows(path)[0]


@contextlib.contextmanager
def _exclusive(path: Path):
    """Refuse two writers on one generations file (advisory lock on ``<file>.lock``). The lock
    file is removed on exit (while still held); a writer that locked a file which was removed
    meanwhile sees another inode at the path and counts as refused, so two writers never both
    hold a lock."""
    import fcntl

    lock_path = path.with_name(path.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = lock_path.exists() and os.stat(lock_path).st_ino == os.fstat(fh.fileno()).st_ino
        except BlockingIOError:
            same = None
        if not same:
            raise ElicitationFileError(f"{path}: another elicit() is writing this file") from None
        try:
            yield
        finally:
            try:
                lock_path.unlink()
            except FileNotFoundError:
                pass
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ elicit


def _template_id(template: PromptTemplate, chat: bool) -> str:
    return json.dumps({"system": template.system, "user": template.user,
                       "plain": None if chat else template.plain}, sort_keys=True)


def _check_resumable(path: Path, rows: list[dict], expect: dict) -> None:
    for i, r in enumerate(rows, start=1):
        meta = r.get("meta") or {}
        bad = {k: (meta.get(k), v) for k, v in expect.items() if k in meta and meta[k] != v}
        if bad:
            diff = ", ".join(f"{k}: file {a!r} vs now {b!r}" for k, (a, b) in bad.items())
            raise ElicitationFileError(
                f"{path}: row {i} ({r.get('key')}) was generated with other settings ({diff}); "
                "use another out_path or the same settings to resume")


def elicit(
    model,
    records: Sequence[Any],
    emotions: Sequence[str] = EKMAN6,
    out_path: str | os.PathLike | None = None,
    gen_config: GenerationConfig | None = None,
    *,
    valences: Sequence[str] = VALENCES,
    template: PromptTemplate = EMOTION_TEMPLATE,
    assistant_prefix: str | None = None,
    chat: bool | None = None,
    batch_size: int = 16,
    progress: bool = True,
    on_batch: Callable[[int, list[dict]], None] | None = None,
) -> list[dict]:
    """Generate a reply for every (record, valence, emotion); return the rows in that order.

    Each row is the paper's layout: ``key`` = ``{skeleton_id}__{valence}__{emotion}``,
    ``skeleton_id, theme, valence, emotion, scenario, event, gen_text`` and ``meta`` =
    {model_id, dtype, device, attn_impl, max_new_tokens, min_new_tokens, repetition_penalty,
    no_repeat_ngram_size, seed (None: greedy), chat, assistant_prefix, template, input_len,
    n_new_tokens, seconds (this row's share of its batch's wall time), time (UTC, ISO)}.
    ``gen_text`` is the decoded continuation (special tokens skipped, stripped); an
    ``assistant_prefix`` is not part of it (it is in ``meta``).

    With ``out_path`` rows are appended per batch (flush + fsync), so a killed run loses at
    most the batch in flight. On start the file is read, a truncated last line dropped (the
    file is then rewritten atomically) and keys already there are skipped: rerunning the
    same call resumes. The items are cut into fixed batches of ``batch_size`` in
    (record, valence, emotion) order; a batch with any missing key is generated whole (and
    only the missing rows written), so a resumed run gives exactly the rows of an
    uninterrupted one. Existing rows made with other settings (model, decoding, template)
    raise ``ElicitationFileError``. ``on_batch(batch_index, new_rows)`` runs after each
    written batch.
    """
    if batch_size < 1:
        raise ValueError(f"elicit: batch_size must be >= 1, got {batch_size}")
    if not records:
        raise ValueError("elicit: no records")
    emotions = tuple(emotions)
    bad_v = [v for v in valences if v not in VALENCES]
    if bad_v:
        raise ValueError(f"elicit: unknown valences {bad_v}; use {VALENCES}")
    cfg = replace(gen_config or GenerationConfig.paper_prompting(), batch_size=batch_size)
    use_chat = is_chat_model(model) if chat is None else bool(chat)
    prompts = emotion_prompts(model, records, emotions, template=template, valences=valences,
                              assistant_prefix=assistant_prefix, chat=use_chat)
    keys = [record_key(p.skeleton_id, p.valence, p.emotion) for p in prompts]
    dup = [k for k, c in Counter(keys).items() if c > 1]
    if dup:
        raise ValueError(f"elicit: duplicate keys {dup[:3]} (records share a skeleton_id?)")
    settings = {
        "model_id": model_id(model), "dtype": str(model.cfg.dtype).replace("torch.", ""),
        "device": str(model.cfg.device),
        "attn_impl": getattr(getattr(model.original_model, "config", None), "_attn_implementation", None),
        "max_new_tokens": cfg.max_new_tokens, "min_new_tokens": cfg.min_new_tokens,
        "repetition_penalty": cfg.repetition_penalty,
        "no_repeat_ngram_size": cfg.no_repeat_ngram_size, "seed": None, "chat": use_chat,
        "assistant_prefix": assistant_prefix, "template": _template_id(template, use_chat),
    }
    path = Path(out_path) if out_path is not None else None
    with (_exclusive(path) if path is not None else contextlib.nullcontext()):
        done: dict[str, dict] = {}
        if path is not None:
            if path.exists():
                rows, dirty = _read_rows(path)
                _check_resumable(path, rows, {k: settings[k] for k in _RESUME_CHECK})
                if dirty:
                    write_jsonl_atomic(rows, path)
                done = {r["key"]: r for r in rows}
        chunks = [list(range(s, min(s + batch_size, len(prompts))))
                  for s in range(0, len(prompts), batch_size)]
        todo = [(b, c) for b, c in enumerate(chunks) if any(keys[i] not in done for i in c)]
        bar = tqdm(total=len(prompts), initial=len(prompts) - sum(
            sum(keys[i] not in done for i in c) for _, c in todo), desc="elicit",
            disable=not progress, unit="gen")
        fh = open(path, "a", encoding="utf-8") if path is not None else None
        try:
            for b, chunk in todo:
                t0 = time.perf_counter()
                res = generate(model, [prompts[i] for i in chunk], cfg, progress=False)
                dt = time.perf_counter() - t0
                stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
                new: list[dict] = []
                for j, i in enumerate(chunk):
                    if keys[i] in done:
                        continue
                    p = prompts[i]
                    row = {
                        "key": keys[i], "skeleton_id": p.skeleton_id, "theme": p.theme,
                        "valence": p.valence, "emotion": p.emotion, "scenario": p.scenario,
                        "event": p.event, "gen_text": res.texts[j],
                        "meta": {**settings, "input_len": res.prompt_lengths[j],
                                 "n_new_tokens": len(res.tokens[j]),
                                 "seconds": dt / len(chunk), "time": stamp},
                    }
                    new.append(row)
                    done[keys[i]] = row
                if fh is not None:
                    fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
                    fh.flush()
                    os.fsync(fh.fileno())
                bar.update(len(new))
                if on_batch is not None:
                    on_batch(b, new)
        finally:
            bar.close()
            if fh is not None:
                fh.close()
    return [done[k] for k in keys]


# ------------------------------------------------------------------------------ judging


def judge_generations(rows: Sequence[dict], judge, *, batch_size: int = 256) -> list[dict]:
    """Copies of ``rows`` with ``judge`` = {match, label, abstained, scores {emotion: score},
    name}; ``abstained`` is why the judge gave no label (``JudgeResult.abstained``) or None.

    The judge sees only ``gen_text`` and the target ``emotion`` (as in the paper). An empty
    (whitespace-only) generation is not sent to the judge: it counts as a miss, label None,
    scores {} (a classifier judge would otherwise give it its tie-break label).
    """
    for i, r in enumerate(rows):
        for k in ("gen_text", "emotion"):
            if k not in r:
                raise KeyError(f"judge_generations: row {i} ({r.get('key')}) has no {k!r}")
    name = getattr(judge, "name", type(judge).__name__)
    verdicts: list[dict] = [{"match": False, "label": None, "abstained": "empty", "scores": {},
                             "name": name} for _ in rows]
    todo = [i for i, r in enumerate(rows) if str(r["gen_text"]).strip()]
    for s in range(0, len(todo), batch_size):
        idx = todo[s:s + batch_size]
        res = judge.judge([rows[i]["gen_text"] for i in idx], [rows[i]["emotion"] for i in idx])
        scores = np.asarray(res.scores, dtype=np.float64)
        why = list(getattr(res, "abstained", None) or [None] * len(idx))
        for j, i in enumerate(idx):
            verdicts[i] = {"match": bool(res.match[j]), "label": res.labels[j],
                           "abstained": why[j],
                           "scores": {e: float(scores[j, k]) for k, e in enumerate(res.emotions)},
                           "name": name}
    return [{**r, "judge": v} for r, v in zip(rows, verdicts, strict=True)]


def complete_groups(judged: Sequence[dict], emotions: Sequence[str]) -> list[tuple[str, str]]:
    """The paper's acceptance filter: the (skeleton_id, valence) groups in which the judge
    accepted the instructed reply of *every* emotion in ``emotions`` (rows of
    ``judge_generations``), in first-seen order. A group missing an emotion's row is incomplete.

    >>> rows = [{"skeleton_id": "s1", "valence": "positive", "emotion": e, "judge": {"match": True}}
    ...         for e in ("anger", "fear")]
    >>> complete_groups(rows, ["anger", "fear"])
    [('s1', 'positive')]
    """
    want = set(emotions)
    seen: dict[tuple[str, str], set[str]] = {}
    bad: set[tuple[str, str]] = set()
    for i, r in enumerate(judged):
        if "judge" not in r:
            raise KeyError(f"complete_groups: row {i} ({r.get('key')}) has no 'judge' (run judge_generations first)")
        g = (str(r["skeleton_id"]), str(r["valence"]))
        seen.setdefault(g, set())
        if r["emotion"] in want:
            if r["judge"].get("match"):
                seen[g].add(r["emotion"])
            else:
                bad.add(g)
    return [g for g, ok in seen.items() if g not in bad and ok == want]


def keep_groups(prompts: Sequence[Any], groups: Iterable[tuple[str, str]]) -> list[Any]:
    """The prompts whose ``(skeleton_id, valence)`` is in ``groups`` (order kept)."""
    keep = {(str(a), str(b)) for a, b in groups}
    return [p for p in prompts if (str(p.skeleton_id), str(p.valence)) in keep]


def prompting_table(rows: Sequence[dict]) -> AccuracyTable:
    """Accuracy of judged rows (``row["judge"]["match"]``): overall, per emotion, per valence."""
    flat = []
    for i, r in enumerate(rows):
        if "judge" not in r:
            raise KeyError(f"prompting_table: row {i} ({r.get('key')}) is not judged; "
                           "run judge_generations first")
        flat.append({"emotion": r["emotion"], "valence": r.get("valence"),
                     "match": bool(r["judge"]["match"]),
                     "abstained": r["judge"].get("abstained")})
    return accuracy_table(flat)


def elicitation_seconds_per_100(rows: Sequence[dict]) -> float:
    """Generation wall time per 100 rows, from each row's ``meta.seconds`` (survives resumes)."""
    secs = [r["meta"]["seconds"] for r in rows if "seconds" in r.get("meta", {})]
    if not secs:
        return float("nan")
    return 100.0 * float(np.sum(secs)) / len(secs)


# ------------------------------------------------------------------------------ readout


@dataclass
class ReadoutAccuracy(Result):
    """The logit readout on instructed prompts scored against the instructed emotion.

    ``table``: argmax_e P(e) == target on "Always reply in {target}" prompts + prefix.
    ``table_no_keyword``: the same with the first token of " {target}" (the instruction
    word itself) removed from the target's token set: a partial control for keyword
    copying (the instruction word is in the prompt, a known flaw); related words (e.g.
    "angry" for "anger") stay.
    ``target_share[e]``: mean share of e on prompts instructed with e;
    ``neutral_target_share[e]``: mean share of e on the NEUTRAL prompt (no instruction) of
    the same scenario and event; the difference is what the instruction adds.
    ``neutral_labels[valence][e]``: fraction of neutral prompts whose argmax is e;
    ``neutral_share[valence][e]``: mean share of e there (the no-instruction reference).
    Chance accuracy is 1 / len(emotions).
    """

    emotions: tuple[str, ...]
    assistant_prefix: str
    table: AccuracyTable
    table_no_keyword: AccuracyTable
    target_share: dict[str, float]
    neutral_target_share: dict[str, float]
    neutral_labels: dict[str, dict[str, float]]
    neutral_share: dict[str, dict[str, float]]
    n_instructed: int
    n_neutral: int

    def _summary(self) -> dict[str, str]:
        return {"emotions": summarize(list(self.emotions)),
                "accuracy": f"{self.table.overall:.4g}",
                "accuracy_no_keyword": f"{self.table_no_keyword.overall:.4g}",
                **{k: v for k, v in super()._summary().items() if k != "emotions"}}

    def to_dataframe(self):
        """One row per emotion: instructed ``accuracy`` (and without the keyword token),
        ``target_share`` and ``neutral_target_share``."""
        import pandas as pd

        nan = float("nan")
        return pd.DataFrame([{"emotion": e,
                              "accuracy": self.table.by_emotion.get(e, nan),
                              "accuracy_no_keyword": self.table_no_keyword.by_emotion.get(e, nan),
                              "target_share": self.target_share.get(e, nan),
                              "neutral_target_share": self.neutral_target_share.get(e, nan)}
                             for e in self.emotions])


def _drop_keyword(es: EmotionSet, tokenizer) -> EmotionSet:
    """Each emotion's words without those whose first token, in any of the readout's word forms
    (``TOKEN_FORMS``), is the emotion name's own in that form."""
    def firsts(word: str) -> list[list[int]]:
        return [tokenizer(f.format(w=word, W=word.capitalize()), add_special_tokens=False)["input_ids"][:1]
                for f in TOKEN_FORMS]

    words = {}
    for e in es.names:
        name_toks = firsts(e)
        keep = tuple(w for w in es.words[e]
                     if not any(a == b for a, b in zip(firsts(w), name_toks, strict=True)))
        if not keep:
            raise ValueError(f"readout_accuracy: no word of {e!r} left once its name is removed")
        words[e] = keep
    return EmotionSet(es.names, words, es.va)


def readout_accuracy(
    model,
    records: Sequence[Any],
    emotions: EmotionSet | Sequence[str] = EKMAN6,
    *,
    valences: Sequence[str] = VALENCES,
    assistant_prefix: str | None = None,
    chat: bool | None = None,
    template: PromptTemplate = EMOTION_TEMPLATE,
    neutral_template: PromptTemplate = NEUTRAL_TEMPLATE,
    batch_size: int = 16,
    progress: bool = False,
) -> ReadoutAccuracy:
    """Readout accuracy beside the prompting table (see ``ReadoutAccuracy``).

    P(e) = Σ_{t ∈ T_e} softmax(logits_last)[t] (``emocircuits.judges.readout``); label =
    argmax_e P(e); match = label == instructed emotion. The prefix defaults to "I feel"
    (chat template) or "I felt" (plain rendering of a base model). One forward per prompt
    (instructed and neutral); both token sets are read off the same logits.
    """
    es = emotions if isinstance(emotions, EmotionSet) else emotion_set(tuple(emotions))
    use_chat = is_chat_model(model) if chat is None else bool(chat)
    prefix = assistant_prefix if assistant_prefix is not None else default_assistant_prefix(model, use_chat)
    instr = emotion_prompts(model, records, es.names, template=template, valences=valences,
                            assistant_prefix=prefix, chat=use_chat)
    neut = neutral_prompts(model, records, template=neutral_template, valences=valences,
                           assistant_prefix=prefix, chat=use_chat)
    logits = last_token_logits(model, [p.text for p in instr + neut], batch_size=batch_size,
                               progress=progress)
    li, ln = logits[:len(instr)], logits[len(instr):]
    toks = emotion_tokens(model, es)
    r_i = readout_from_logits(li, toks)
    r_nk = readout_from_logits(li, emotion_tokens(model, _drop_keyword(es, model.tokenizer)))
    r_n = readout_from_logits(ln, toks)
    names = list(es.names)

    def table(labels: list[str]) -> AccuracyTable:
        return accuracy_table([{"emotion": p.emotion, "valence": p.valence, "match": lab == p.emotion}
                               for p, lab in zip(instr, labels, strict=True)])

    share_i, share_n = r_i.share, r_n.share
    neut_row = {p.group: i for i, p in enumerate(neut)}
    tgt: dict[str, list[float]] = defaultdict(list)
    tgt_n: dict[str, list[float]] = defaultdict(list)
    for i, p in enumerate(instr):
        j = names.index(p.emotion)
        tgt[p.emotion].append(float(share_i[i, j]))
        tgt_n[p.emotion].append(float(share_n[neut_row[p.group], j]))
    n_labels: dict[str, dict[str, float]] = {}
    n_share: dict[str, dict[str, float]] = {}
    labels_n = r_n.labels
    for v in valences:
        sel = [i for i, p in enumerate(neut) if p.valence == v]
        if not sel:
            continue
        cnt = Counter(labels_n[i] for i in sel)
        n_labels[v] = {e: cnt.get(e, 0) / len(sel) for e in names}
        n_share[v] = {e: float(share_n[sel, j].mean()) for j, e in enumerate(names)}
    return ReadoutAccuracy(
        emotions=tuple(names), assistant_prefix=prefix, table=table(r_i.labels),
        table_no_keyword=table(r_nk.labels),
        target_share={e: float(np.mean(tgt[e])) for e in names if tgt[e]},
        neutral_target_share={e: float(np.mean(tgt_n[e])) for e in names if tgt_n[e]},
        neutral_labels=n_labels, neutral_share=n_share,
        n_instructed=len(instr), n_neutral=len(neut))


def judge_confusion(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    """{target emotion: {label read: count}}, most frequent first: what the judge read for each
    instruction. Rows carry ``emotion`` and ``label`` (``evaluate_texts`` rows) or
    ``judge.label`` (``judge_generations`` rows); an unjudged (empty) reply counts as "None"."""
    out: dict[str, Counter] = defaultdict(Counter)
    for i, r in enumerate(rows):
        if "label" in r:
            lab = r["label"]
        elif isinstance(r.get("judge"), dict):
            lab = r["judge"].get("label")
        else:
            raise KeyError(f"judge_confusion: row {i} ({r.get('key')}) has no label")
        out[r["emotion"]][str(lab)] += 1
    return {e: dict(c.most_common()) for e, c in out.items()}


def elicitation_timing(rows: Sequence[dict]) -> dict[str, float | int]:
    """Generation cost from the rows' ``meta``: seconds per 100 generations, mean new tokens."""
    toks = [r["meta"]["n_new_tokens"] for r in rows if "n_new_tokens" in r.get("meta", {})]
    return {"n_generations": len(rows),
            "elicit_s_per_100_generations": elicitation_seconds_per_100(rows),
            "mean_new_tokens": float(np.mean(toks)) if toks else float("nan")}


@dataclass
class NeutralReadout(Result):
    """The logit readout on NEUTRAL prompts (no instruction) + an assistant prefix, per item.

    ``share[i, j]``: emotion j's share of the emotion-word mass at prompt i (renormalised over
    the emotions); ``labels[i]``: its argmax; ``valence_score[i]`` = P(positive emotions'
    words) − P(negative emotions' words) (raw mass); ``valence_score_mean[v]``: its mean on
    events of valence v; ``label_fraction[v][e]``: how often e is the argmax there;
    ``valence_auc``: AUC of the score, positive vs negative events (None without both).
    """

    emotions: list[str]
    assistant_prefix: str
    items: list[dict]  # {"skeleton_id", "valence"} per row
    share: Float[np.ndarray, "n emotion"]
    labels: list[str]
    valence_score: Float[np.ndarray, "n"]
    valence_score_mean: dict[str, float]
    label_fraction: dict[str, dict[str, float]]  # valence -> emotion -> argmax fraction
    valence_auc: float | None = None

    def to_dataframe(self):
        import pandas as pd

        df = pd.DataFrame(self.share, columns=self.emotions)
        df.insert(0, "valence", [it["valence"] for it in self.items])
        df.insert(0, "skeleton_id", [it["skeleton_id"] for it in self.items])
        df["argmax"] = self.labels
        df["valence_score"] = self.valence_score
        return df


def neutral_readout(
    model,
    records: Sequence[Any],
    emotions: EmotionSet | Sequence[str] = EKMAN6,
    *,
    assistant_prefix: str | None = "I feel",
    valences: Sequence[str] = VALENCES,
    chat: bool | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> NeutralReadout:
    """The readout on neutral prompts of ``records`` (one forward per prompt), see
    :class:`NeutralReadout`. ``assistant_prefix=None``: the model's default ("I feel" after a
    chat template, "I felt" after the plain rendering)."""
    from .judges.readout import auc

    es = emotions if isinstance(emotions, EmotionSet) else emotion_set(tuple(emotions))
    use_chat = is_chat_model(model) if chat is None else bool(chat)
    prefix = assistant_prefix if assistant_prefix is not None else default_assistant_prefix(model, use_chat)
    prompts = neutral_prompts(model, records, valences=valences, assistant_prefix=prefix or None,
                              chat=use_chat)
    logits = last_token_logits(model, [p.text for p in prompts], batch_size=batch_size,
                               progress=progress)
    r = readout_from_logits(logits, emotion_tokens(model, es))
    vs = np.asarray(r.valence_score(), dtype=np.float64)
    val = np.array([p.valence for p in prompts])
    labels = r.labels
    means, fracs = {}, {}
    for v in valences:
        sel = val == v
        if sel.any():
            means[v] = float(vs[sel].mean())
            cnt = Counter(lab for lab, s in zip(labels, sel, strict=True) if s)
            fracs[v] = {e: cnt.get(e, 0) / int(sel.sum()) for e in es.names}
    pos, neg = vs[val == "positive"], vs[val == "negative"]
    auc_v = float(auc(pos, neg)) if len(pos) and len(neg) else None
    return NeutralReadout(list(es.names), prefix, [{"skeleton_id": p.skeleton_id, "valence": p.valence}
                                                   for p in prompts],
                          np.asarray(r.share, dtype=np.float64), labels, vs, means, fracs, auc_v)


__all__ = [
    "ElicitationFileError", "NeutralReadout", "RECORD_FIELDS", "ReadoutAccuracy", "VALENCES",
    "default_assistant_prefix", "elicit", "elicitation_seconds_per_100", "elicitation_timing",
    "judge_confusion", "judge_generations", "load_generations", "neutral_readout",
    "prompting_table", "readout_accuracy", "record_key",
    "write_json_atomic", "write_jsonl_atomic",
]
