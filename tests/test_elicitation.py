from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from emocircuits.data import load_sev
from emocircuits.elicitation import (
    RECORD_FIELDS,
    ElicitationFileError,
    default_assistant_prefix,
    elicit,
    elicitation_seconds_per_100,
    judge_generations,
    load_generations,
    prompting_table,
    readout_accuracy,
)
from emocircuits.emotions import emotion_set
from emocircuits.generation import GenerationConfig
from emocircuits.judges.base import JudgeResult
from emocircuits.prompts import emotion_prompts, encode, neutral_prompts

EMOS = ("anger", "fear", "happiness")
CFG = GenerationConfig(max_new_tokens=6)
VOLATILE = ("time", "seconds")  # the only fields allowed to differ between runs


@pytest.fixture(scope="module")
def recs():
    return load_sev("builtin:test")[:2]  # 2 scenarios x 3 valences x 3 emotions = 18 rows


def _stable(rows):
    return [{**r, "meta": {k: v for k, v in r["meta"].items() if k not in VOLATILE}} for r in rows]


def _file_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_llama, recs, tmp_path_factory):
    """An uninterrupted run (batch size 4: 5 batches, the last one partial)."""
    path = tmp_path_factory.mktemp("ref") / "gen.jsonl"
    rows = elicit(tiny_llama, recs, EMOS, path, CFG, batch_size=4, progress=False)
    return path, rows


def _hf_greedy(model, text, n):
    ids = torch.tensor([encode(model, text)])
    out = model.original_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=n, pad_token_id=model.tokenizer.pad_token_id)
    out = out[0, ids.shape[1]:].tolist()
    eos = model.tokenizer.eos_token_id
    return out[:out.index(eos)] if eos in out else out


def test_record_layout_and_texts(tiny_llama, recs, reference):
    path, rows = reference
    on_disk = _file_rows(path)
    assert on_disk == rows and len(rows) == 2 * 3 * len(EMOS)
    prompts = emotion_prompts(tiny_llama, recs, EMOS)
    by_id = {r.skeleton_id: r for r in recs}
    for p, r in zip(prompts, rows, strict=True):
        assert tuple(r) == RECORD_FIELDS
        assert r["key"] == f"{r['skeleton_id']}__{r['valence']}__{r['emotion']}"
        rec = by_id[r["skeleton_id"]]
        assert (r["theme"], r["scenario"], r["event"]) == (rec.theme, rec.scenario, rec.event[r["valence"]])
        assert (r["valence"], r["emotion"]) == (p.valence, p.emotion)
        m = r["meta"]
        assert m["model_id"] == "tiny-llama-s0" and m["dtype"] == "float32" and m["device"] == "cpu"
        assert m["max_new_tokens"] == 6 and m["chat"] is True and m["seed"] is None
        assert m["input_len"] == len(encode(tiny_llama, p.text))
        assert "Always reply in " + r["emotion"] + "." in p.text
    # texts against HF generate, one prompt at a time (other code path, no padding)
    for i in (0, 7, 17):
        ref = _hf_greedy(tiny_llama, prompts[i].text, 6)
        assert rows[i]["meta"]["n_new_tokens"] == len(ref)
        assert rows[i]["gen_text"] == tiny_llama.tokenizer.decode(ref, skip_special_tokens=True).strip()
    assert load_generations(path) == rows
    assert elicitation_seconds_per_100(rows) > 0


def test_resume_after_kill_equals_uninterrupted(tiny_llama, recs, reference, tmp_path):
    ref_path, ref_rows = reference
    path = tmp_path / "gen.jsonl"

    class Killed(RuntimeError):
        pass

    def kill_after_second(b, new):
        if b == 1:
            raise Killed

    with pytest.raises(Killed):
        elicit(tiny_llama, recs, EMOS, path, CFG, batch_size=4, progress=False,
               on_batch=kill_after_second)
    assert len(_file_rows(path)) == 8  # two fsynced batches survived
    seen = []
    rows = elicit(tiny_llama, recs, EMOS, path, CFG, batch_size=4, progress=False,
                  on_batch=lambda b, new: seen.append(b))
    assert seen == [2, 3, 4]  # only the missing batches ran
    final = _file_rows(path)
    keys = [r["key"] for r in final]
    assert len(keys) == len(set(keys)) == 18
    assert _stable(final) == _stable(_file_rows(ref_path))
    assert _stable(rows) == _stable(ref_rows)
    # a third run has nothing to do and changes nothing
    again = elicit(tiny_llama, recs, EMOS, path, CFG, batch_size=4, progress=False,
                   on_batch=lambda b, new: pytest.fail("nothing should be generated"))
    assert again == rows and _file_rows(path) == final


def test_truncated_last_line_dropped_and_resumed(tiny_llama, recs, reference, tmp_path):
    ref_path, ref_rows = reference
    lines = ref_path.read_text().splitlines(keepends=True)
    path = tmp_path / "gen.jsonl"
    # 10 complete rows (batch 3 half written) + half of the 11th: a killed writer
    path.write_text("".join(lines[:10]) + lines[10][: len(lines[10]) // 2])
    with pytest.raises(ElicitationFileError, match=r"gen.jsonl:11"):
        load_generations(path)
    with pytest.warns(UserWarning, match="truncated last line"):
        assert len(load_generations(path, strict=False)) == 10
    with pytest.warns(UserWarning, match="truncated last line"):
        rows = elicit(tiny_llama, recs, EMOS, path, CFG, batch_size=4, progress=False)
    final = _file_rows(path)
    assert [r["key"] for r in final] == [r["key"] for r in ref_rows]
    assert _stable(final) == _stable(ref_rows) == _stable(rows)


def test_bad_middle_line_and_other_settings_raise(tiny_llama, recs, reference, tmp_path):
    ref_path, _ = reference
    lines = ref_path.read_text().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    with pytest.raises(ElicitationFileError, match=r"bad.jsonl:2"):
        elicit(tiny_llama, recs, EMOS, bad, CFG, batch_size=4, progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(lines[:4]))
    with pytest.raises(ElicitationFileError, match="max_new_tokens"):
        elicit(tiny_llama, recs, EMOS, other, GenerationConfig(max_new_tokens=7), batch_size=4,
               progress=False)


def test_base_model_rendering_and_prefix(tiny_llama, recs):
    assert default_assistant_prefix(tiny_llama) == "I feel"
    assert default_assistant_prefix(tiny_llama, chat=False) == "I felt"
    rows = elicit(tiny_llama, recs[:1], ("fear",), None, GenerationConfig(max_new_tokens=2),
                  valences=("negative",), chat=False, progress=False)
    assert len(rows) == 1 and rows[0]["meta"]["chat"] is False
    plain = emotion_prompts(tiny_llama, recs[:1], ("fear",), valences=("negative",), chat=False)[0]
    assert plain.text.endswith("Reply:") and rows[0]["meta"]["input_len"] == len(encode(tiny_llama, plain.text))


class _FakeJudge:
    name = "fake"
    emotions = ("anger", "fear")

    def judge(self, texts, targets):
        labels = ["anger" if "grr" in t else "fear" for t in texts]
        scores = np.array([[0.9, 0.1] if lab == "anger" else [0.2, 0.8] for lab in labels])
        return JudgeResult(self.emotions, labels, scores, [lab == t for lab, t in zip(labels, targets, strict=True)])


def test_judge_and_prompting_table_on_crafted_rows():
    spec = [  # (emotion, valence, text) -> match when text says the target
        ("anger", "positive", "grr"), ("anger", "positive", "eek"), ("anger", "negative", "grr"),
        ("fear", "positive", "eek"), ("fear", "negative", "grr"), ("fear", "negative", "grr"),
        ("fear", "neutral", "eek"), ("anger", "neutral", "  "),
    ]
    rows = [{"key": f"s{i}__{v}__{e}", "emotion": e, "valence": v, "gen_text": t}
            for i, (e, v, t) in enumerate(spec)]
    judged = judge_generations(rows, _FakeJudge(), batch_size=3)
    assert [r["key"] for r in judged] == [r["key"] for r in rows] and "judge" not in rows[0]
    assert judged[0]["judge"] == {"match": True, "label": "anger", "abstained": None,
                                  "name": "fake", "scores": {"anger": 0.9, "fear": 0.1}}
    assert judged[-1]["judge"] == {"match": False, "label": None, "abstained": "empty",
                                   "name": "fake", "scores": {}}
    t = prompting_table(judged)
    assert t.n == 8 and t.overall == pytest.approx(4 / 8) and t.n_abstained == 1
    assert t.by_emotion == pytest.approx({"anger": 2 / 4, "fear": 2 / 4})
    assert t.by_valence == pytest.approx({"positive": 2 / 3, "negative": 1 / 3, "neutral": 1 / 2})
    assert t.by_emotion_valence == pytest.approx(
        {"anger/positive": 0.5, "anger/negative": 1.0, "fear/positive": 1.0,
         "fear/negative": 0.0, "fear/neutral": 1.0, "anger/neutral": 0.0})
    with pytest.raises(KeyError, match="not judged"):
        prompting_table(rows)


def _brute_readout(model, texts, es):
    """argmax_e Σ_{T_e} p, one unpadded HF forward per prompt (float64); T_e = first tokens of
    " w" and "w" that decode to the word or a >= 4-letter prefix, minus tokens of two emotions."""
    tok = model.tokenizer
    cand = {}
    for e in es.names:
        cand[e] = set()
        for w in es.words[e]:
            for s in (" " + w, w):
                t = tok(s, add_special_tokens=False)["input_ids"][0]
                piece = tok.decode([t]).strip().lower()
                if piece == w or (len(piece) >= 4 and w.startswith(piece)):
                    cand[e].add(t)
    sets = {e: cand[e] - set().union(*(cand[f] for f in es.names if f != e)) for e in es.names}
    labels, shares = [], []
    for t in texts:
        with torch.no_grad():
            logits = model.original_model(torch.tensor([encode(model, t)])).logits[0, -1]
        p = torch.softmax(logits.double(), -1)
        mass = np.array([float(p[sorted(sets[e])].sum()) for e in es.names])
        labels.append(es.names[int(mass.argmax())])
        shares.append(mass / mass.sum())
    return labels, np.array(shares)


def test_readout_accuracy_equals_brute_force(tiny_llama, recs):
    es = emotion_set(("anger", "fear", "joy"), words={
        "anger": ("anger", "storm", "red", "fight"), "fear": ("fear", "dark", "ghost", "night"),
        "joy": ("joy", "sun", "cake", "party")})
    ra = readout_accuracy(tiny_llama, recs, es, batch_size=5)
    assert ra.assistant_prefix == "I feel" and ra.n_instructed == 18 and ra.n_neutral == 6
    instr = emotion_prompts(tiny_llama, recs, es.names, assistant_prefix="I feel")
    neut = neutral_prompts(tiny_llama, recs, assistant_prefix="I feel")
    assert all(p.text.endswith("I feel") for p in instr + neut)
    labels, shares = _brute_readout(tiny_llama, [p.text for p in instr], es)
    match = [lab == p.emotion for lab, p in zip(labels, instr, strict=True)]
    assert ra.table.overall == pytest.approx(np.mean(match))
    for e in es.names:
        sel = [m for m, p in zip(match, instr, strict=True) if p.emotion == e]
        assert ra.table.by_emotion[e] == pytest.approx(np.mean(sel))
        tshare = [shares[i, es.names.index(e)] for i, p in enumerate(instr) if p.emotion == e]
        assert ra.target_share[e] == pytest.approx(np.mean(tshare), abs=1e-5)
    for v in ("positive", "neutral", "negative"):
        sel = [m for m, p in zip(match, instr, strict=True) if p.valence == v]
        assert ra.table.by_valence[v] == pytest.approx(np.mean(sel))
    # keyword token removed: words minus the emotion's own name
    es_nk = emotion_set(es.names, words={e: es.words[e][1:] for e in es.names})
    labels_nk, _ = _brute_readout(tiny_llama, [p.text for p in instr], es_nk)
    assert ra.table_no_keyword.overall == pytest.approx(
        np.mean([lab == p.emotion for lab, p in zip(labels_nk, instr, strict=True)]))
    # neutral (no instruction) reference per valence
    labels_n, shares_n = _brute_readout(tiny_llama, [p.text for p in neut], es)
    for v in ("positive", "neutral", "negative"):
        idx = [i for i, p in enumerate(neut) if p.valence == v]
        for j, e in enumerate(es.names):
            assert ra.neutral_labels[v][e] == pytest.approx(np.mean([labels_n[i] == e for i in idx]))
            assert ra.neutral_share[v][e] == pytest.approx(shares_n[idx, j].mean(), abs=1e-5)
    # the neutral prompt of the same group is the reference share of each instructed row
    for e in es.names:
        want = np.mean([shares_n[[q.group for q in neut].index(p.group), es.names.index(e)]
                        for p in instr if p.emotion == e])
        assert ra.neutral_target_share[e] == pytest.approx(want, abs=1e-5)


def test_readout_accuracy_base_rendering(tiny_gemma, recs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ra = readout_accuracy(tiny_gemma, recs[:1], ("anger", "fear"), chat=False)
    assert ra.assistant_prefix == "I felt" and ra.table.n == 6
    assert set(ra.neutral_labels) == {"positive", "neutral", "negative"}


@pytest.mark.integration
def test_smollm2_elicit_equals_hf_and_resumes(smol, tmp_path):
    recs = load_sev("builtin:test")[:1]
    path = tmp_path / "gen.jsonl"
    cfg = GenerationConfig(max_new_tokens=12)
    rows = elicit(smol, recs, ("happiness", "anger"), path, cfg, valences=("negative",),
                  batch_size=1, progress=False)
    prompts = emotion_prompts(smol, recs, ("happiness", "anger"), valences=("negative",))
    for p, r in zip(prompts, rows, strict=True):
        ref = _hf_greedy(smol, p.text, 12)
        assert r["gen_text"] == smol.tokenizer.decode(ref, skip_special_tokens=True).strip()
        assert r["meta"]["chat"] is True and r["meta"]["input_len"] == len(encode(smol, p.text))
    assert elicit(smol, recs, ("happiness", "anger"), path, cfg, valences=("negative",),
                  batch_size=1, progress=False,
                  on_batch=lambda b, new: pytest.fail("resumed run regenerated")) == rows
