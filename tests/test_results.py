"""The one result contract: every result type round-trips through ``save``/``load`` exactly,
and bad files (tampered, truncated, foreign, crafted) are refused with the file named."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings

import numpy as np
import pytest
import torch

from emocircuits import activations as A
from emocircuits import circuits as CI
from emocircuits import components as CO
from emocircuits import control as CT
from emocircuits import directions as D
from emocircuits import elicitation as EL
from emocircuits import evaluate as EV
from emocircuits import generation as G
from emocircuits import patching as PA
from emocircuits import probes as PR
from emocircuits import stats as ES
from emocircuits import steering as ST
from emocircuits import story_directions as SD
from emocircuits.judges import base as JB
from emocircuits.judges import readout as JR
from emocircuits.results import (
    FORMAT,
    Result,
    ResultFileError,
    ResultFileMissing,
    load_result,
    result_types,
)

EMO = ["anger", "joy", "fear"]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _t(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=_g(seed), dtype=torch.float64) * 2 + 0.5).to(dtype)


def _a(*shape, seed=0, dtype=np.float64) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=shape) * 2 + 0.5).astype(dtype)


def _f(seed=0) -> float:
    return float(np.random.default_rng(seed).uniform(0.05, 0.95))


# ----------------------------------------------------------------------------- comparison


def assert_same(a, b, where="obj"):
    """Deep equality: same types, tensors/arrays bit-equal with the same dtype, NaN == NaN."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: {type(b).__name__} is not a tensor"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num())), where
        return
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f"{where}: {type(b).__name__} is not an ndarray"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), where
        return
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
        for f in dataclasses.fields(a):
            if not f.name.startswith("_"):
                assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} vs {list(b) if isinstance(b, dict) else b}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
        return
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {type(a).__name__}{len(a)} vs {type(b).__name__}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
        return
    if type(a).__module__.startswith(("emocircuits.", "sklearn.")) and hasattr(a, "__dict__"):
        assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"  # a fitted model
        pub = lambda o: {k: v for k, v in vars(o).items() if not k.startswith("_")}  # noqa: E731
        assert_same(pub(a), pub(b), where)
        return
    if isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: {b!r} is not NaN"
        return
    assert type(a) is type(b) and a == b, f"{where}: {a!r} ({type(a).__name__}) vs {b!r} ({type(b).__name__})"


# ----------------------------------------------------------------------------- builders


def _sklearn_probe():
    x = _a(60, 6, seed=3, dtype=np.float32)
    y = [EMO[i % 3] for i in range(60)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PR.fit_probe(x, y, layer=1, kind="mlp", backend="sklearn", C=0.3, hidden=5), x


def _torch_probe():
    x = _a(60, 6, seed=4, dtype=np.float32)
    y = [EMO[i % 3] for i in range(60)]
    return PR.fit_probe(x, y, layer=-1, kind="logreg", backend="torch"), x


def _decod(seed):
    return D.Decodability("resid_post", [0, 2], EMO, _a(2, seed=seed), _a(2, seed=seed + 1), 4, 2)


def _acc(seed):
    return EV.AccuracyTable(_f(seed), 7 + seed, {"anger": _f(seed + 1), "joy": _f(seed + 2)},
                            {"positive": _f(seed + 3)}, {"anger/positive": _f(seed + 4)})


def _tokens():
    return JR.EmotionTokens(("anger", "joy"), {"anger": (11, 12), "joy": (13,)},
                            {"anger": ("angry", "mad"), "joy": ("happy",)}, {14: ("anger", "joy")})


def _va(seed=0):
    return CT.VADirections(_t(2, 3, 8, seed=seed), [1, 2, 4], "lstsq", "resid_mid",
                           meta={"emotions": EMO, "low_arousal": ("sadness", "neutral")})


def _agreement(seed):
    return PR.ValenceAgreement(_f(seed), _f(seed + 1), float("nan"),
                               {"positive": [_f(seed + 2), _f(seed + 3)]}, {"negative": -_f(seed + 4)})


BUILDERS = {
    "Activations": lambda tiny: A.collect(tiny, ["I am so angry today", "what a lovely day", "hm"],
                                          ("resid_post", "z"), "all", layers=[0, 2], progress=False),
    "GroupInfo": lambda _: D.GroupInfo([("s1", "positive"), ("s2", "negative"), "s3"],
                                       {("s9", "positive"): ["joy"], 4: ["fear", "anger"]}),
    "EmotionDirections": lambda _: D.EmotionDirections(
        EMO, [0, 2], {"resid_post": _t(3, 2, 8, seed=1), "resid_mid": _t(3, 2, 8, seed=2, dtype=torch.float16)},
        {"method": "context_agnostic", "n": 12, "groups": {"n_used": 3}}),
    "CosineMatrix": lambda _: D.CosineMatrix(["Attn0", "MLP0", "Attn1"], _a(3, 3, seed=5)),
    "Decodability": lambda _: _decod(6),
    "KeywordControlResult": lambda _: D.KeywordControlResult(_decod(7), _decod(9), ["red", "blue"],
                                                               _a(2, seed=11, dtype=np.float32)),
    "NeuronContributions": lambda _: CO.NeuronContributions(
        EMO, [0, 1], *(_t(3, 2, 16, seed=s) for s in range(5)), {"anger": 3, "joy": 2, "fear": 4},
        {"position": "last"}),
    "HeadImportance": lambda _: CO.HeadImportance(EMO, [0, 1], _t(3, 2, 4, seed=1), _t(3, 2, 4, seed=2),
                                                  None, {"anger": 2}, "attribution", {"readout": "final"}),
    "ComponentSweep": lambda _: CO.ComponentSweep(
        "anger", "neurons", "ablate", [1, 4], ["s_final", "s_logit"], torch.tensor([float("nan"), 0.3]),
        _t(2, 2, seed=1), _t(2, 2, seed=2), _t(2, 2, seed=3), _t(3, 2, 2, seed=4), {"seeds": [0, 1, 2]}),
    "DifferenceVectors": lambda _: CI.DifferenceVectors(
        EMO, _t(3, 2, 16, seed=1), _t(3, 2, 4, 4, seed=2), D.GroupInfo([("s", "positive")], {("t", "negative"): ["joy"]})),
    "StoryDifferenceVectors": lambda _: SD.StoryDifferenceVectors(
        EMO, CI.DifferenceVectors(EMO, _t(3, 2, 16, seed=3), _t(3, 2, 4, 4, seed=4)), _t(3, 2, 16, seed=5),
        {e: i + 2 for i, e in enumerate(EMO)}, 7),
    "VAGeometry": lambda _: SD.va_geometry(_t(4, 2, 8, seed=5), ["anger", "fear", "happiness", "calm"],
                                           n_permutations=50),
    "InfluenceResult": lambda _: CI.InfluenceResult(EMO, [0.1, 0.5], [0, 1, 2], _t(3, 2, 2, 3, seed=1),
                                                    _t(3, seed=2), _t(3, 8, seed=3), _t(2, 3, seed=4), 9),
    "Allocation": lambda _: CI.Allocation([3, 0, 2], [1, 1, 0], {"raw": _a(2, 3, seed=2), "ratio": 0.25}),
    "EmotionCircuit": lambda _: CI.EmotionCircuit(
        "joy", [[3, 1], [], [7]], [[0], [2, 3], []],
        [_t(2, seed=1), torch.zeros(0), _t(1, seed=2, dtype=torch.float64)],
        [_t(1, 4, seed=3), _t(2, 4, seed=4), torch.zeros(0, 4)], {"alpha": 0.3, "sizes": (3, 3)}),
    "FaithfulnessResult": lambda _: CI.FaithfulnessResult(
        "anger", {"neutral": _f(1), "circuit": _f(2)}, {"neutral": _f(3)}, _f(4), float("nan"),
        {"circuit": _f(5), "random": [_f(6), _f(7)]}, {"circuit": -_f(8)}),
    "PatchingResult": lambda _: PA.PatchingResult(_t(3, 4, seed=1, dtype=torch.float64), ("layer", "head"),
                                                  [0, 1, 2], _f(1), _f(2), {"site": "z"}),
    "ProbeState": lambda _: PR.ProbeState.of(_sklearn_probe()[0].estimator),
    "Probe": lambda _: _torch_probe()[0],
    "ProbeSweep": lambda _: PR.ProbeSweep(
        [-1, 0, 1], tuple(EMO), "logreg", "mean", 2, _a(3, seed=1), _a(3, seed=2), _a(3, seed=3), _a(3, seed=4),
        _f(1), 1 / 3, 30, 5, "group", test_accuracy=_a(3, seed=5),
        oof_pred=np.random.default_rng(1).integers(0, 3, (3, 30)), seconds=1.5, meta={"n_layers": 2}),
    "ZeroShotResult": lambda _: PR.ZeroShotResult(tuple(EMO), ['{"emotion": "joy"}', "no idea"], ["joy", None],
                                                  ["joy", "fear"], _a(2, 3, seed=1), 0.5, 0.5, 1.0, 0.5, 2.5),
    "PersistenceResult": lambda _: PR.PersistenceResult(
        1, tuple(EMO), np.arange(4), np.array([5, 5, 4, 2]), _a(4, seed=1), None, _f(2), [0, 1, 2],
        _a(3, seed=3), _a(3, seed=4), 0.4, 1 / 3, ["a b", "c"], _t(2, 4, 8, seed=5), [3, 4],
        [[1, 2, 3, 4], [5, 6]], {"collect": 0.5}, ["note"]),
    "MalleabilityResult": lambda _: PR.MalleabilityResult(
        tuple(EMO), ["none", "calm"], {"none": None, "calm": "Stay calm."},
        {"none": _a(4, 3, seed=1), "calm": _a(4, 3, seed=2, dtype=np.float32)}),
    "ValenceAgreement": lambda _: _agreement(1),
    "SEVProbeCheck": lambda _: PR.SEVProbeCheck(EMO, 12, _f(1), {"positive": _f(2)},
                                                {"probe": _agreement(3), "in_context_probe": _agreement(8)}),
    "VADirections": lambda _: _va(),
    "VAComparison": lambda _: CT.VAComparison([1, 2], _t(2, 2, seed=1), _t(2, seed=2), _t(2, seed=3)),
    "AxisScores": lambda _: CT.AxisScores(_f(1), _f(2), _f(3), _f(4), float("nan")),
    "ControllabilityResult": lambda _: CT.ControllabilityResult(
        [(0.5, -0.5), (-1.0, 1.0)], _a(2, 3, 2, seed=1), None, [["x", "y", "z"], ["u", "v", "w"]],
        {"layer": 2, "scale": 4.0}),
    "SteeringSweep": lambda _: ST.SteeringSweep(
        [{"layers": "1-2", "alpha": 0.5, "emotion": "joy", "readout_share": _f(1), "judge_accuracy": None,
          "perplexity": float("inf"), "examples": ["a", "b"]}], {"site": "resid_post", "alphas": [0.0, 0.5]}),
    "AccuracyTable": lambda _: _acc(1),
    "FluencyResult": lambda _: EV.FluencyResult([_f(1) * 10, float("nan")], [_f(2), 0.0], 3),
    "MethodEvaluation": lambda _: EV.MethodEvaluation(
        "steering", _acc(2), {"perplexity_geomean": _f(3)}, [{"emotion": "joy", "match": True, "label": None}],
        {"overall": _f(4)}, [{"text": "hi"}]),
    "ReadoutAccuracy": lambda _: EL.ReadoutAccuracy(
        tuple(EMO), "I feel", _acc(3), _acc(4), {"joy": _f(1)}, {"joy": _f(2)},
        {"positive": {"joy": _f(3)}}, {"negative": {"fear": _f(4)}}, 18, 6),
    "NeutralReadout": lambda _: EL.NeutralReadout(
        EMO, "I feel", [{"skeleton_id": "s1", "valence": "positive"}], _a(1, 3, seed=1), ["joy"], _a(1, seed=2),
        {"positive": _f(3)}, {"positive": {"joy": 1.0}}, None),
    "GenerationResult": lambda _: G.GenerationResult(["hello there", ""], [[5, 6], []], [4, 7], 0.25,
                                                     {"config": {"max_new_tokens": 3}}),
    "JudgeResult": lambda _: JB.JudgeResult(("anger", "joy"), ["joy", None], _a(2, 2, seed=1), [True, False],
                                            {"judge": "lexicon", "mass": _a(2, 2, seed=2)}),
    "EmotionTokens": lambda _: _tokens(),
    "ReadoutResult": lambda _: JR.ReadoutResult(("anger", "joy"), _a(3, 2, seed=1, dtype=np.float32), _tokens()),
    "Estimate": lambda _: ES.Estimate(_f(1), _f(2) - 0.5, _f(3) + 0.5, 18, 3, _f(4)),
    "MethodComparison": lambda _: EV.MethodComparison(
        [{"method": "circuit", "fluent_accuracy": _f(1), "n": 18, "perplexity_median": None}],
        {"circuit − steering": ES.Estimate(_f(2), -0.1, 0.4, 18, 3, 0.03)},
        ["circuit better than steering: +12.0 points"], _f(5) * 10, 3.0, 0.3),
}

# result types defined outside the library modules this file covers (studies/ has its own tests)
_ELSEWHERE = ("emocircuits.studies", "tests.", "test_")


def test_every_library_result_type_has_a_round_trip_test():
    lib = {n for n, c in result_types().items()
           if c.__module__.startswith("emocircuits.") and not c.__module__.startswith(_ELSEWHERE)}
    missing = sorted(lib - set(BUILDERS))
    assert not missing, f"result types without a round-trip test in BUILDERS: {missing}"


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_round_trip(name, tmp_path, tiny_llama):
    obj = BUILDERS[name](tiny_llama)
    cls = result_types()[name]
    assert type(obj) is cls
    js = obj.save(tmp_path / "sub" / name)
    assert js == tmp_path / "sub" / f"{name}.json" and js.is_file()
    assert not [p for p in js.parent.iterdir() if p.suffix == ".tmp"]
    doc = json.loads(js.read_text())
    assert doc["format"] == FORMAT and doc["type"] == name
    for back in (cls.load(js), cls.load(tmp_path / "sub" / name), load_result(js.with_suffix(".safetensors"))):
        assert_same(obj, back, name)
    back.to_dict()  # the summary still works on the loaded object
    json.dumps(Result.to_dict(back), allow_nan=False)


def test_probes_predict_the_same_after_load(tmp_path):
    for make in (_sklearn_probe, _torch_probe):
        probe, x = make()
        back = PR.Probe.load(probe.save(tmp_path / "p"))
        assert type(back.estimator) is type(probe.estimator)
        assert np.array_equal(back.predict_proba(x), probe.predict_proba(x)) and back.predict(x) == probe.predict(x)
    # an estimator that is neither TorchProbeModel nor the sklearn models is not saved
    odd = PR.Probe(object(), ("a",), 0)
    with pytest.raises(TypeError, match="cannot save a Probe"):
        odd.save(tmp_path / "odd")


def test_activation_shards_are_checked(tmp_path, tiny_llama):
    texts = ["one two", "three four five", "six", "seven eight"]
    out = tmp_path / "sh"
    acts = A.collect(tiny_llama, texts, "resid_post", "last", layers=[1], out_dir=out, shard_size=2,
                     batch_size=1, progress=False)
    index = json.loads((out / "index.json").read_text())
    assert set(index["sha256"]) == set(index["shards"]) and len(index["shards"]) == 2
    assert_same(acts, A.Activations.load(out))
    shard = out / index["shards"][1]
    good = shard.read_bytes()
    shard.write_bytes(good[:-4] + b"\0\0\0\0")
    with pytest.raises(ResultFileError, match="shard_00001"):
        A.Activations.load(out)
    shard.write_bytes(good)
    for bad in ({**index, "shards": ["../../etc/passwd"]}, {**index, "layers": {"resid_post": "x"}}, [1, 2]):
        (out / "index.json").write_text(json.dumps(bad))
        with pytest.raises(ResultFileError, match="index.json"):
            A.Activations.load(out)
    (out / "index.json").write_text(json.dumps(index)[:-10])
    with pytest.raises(ResultFileError, match="index.json"):
        A.Activations.load(out)
    (out / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match="index.json"):
        A.Activations.load(out)


# ----------------------------------------------------------------------------- refusals


def test_class_name_clash_is_refused():
    with pytest.raises(TypeError, match="AccuracyTable"):
        type("AccuracyTable", (Result,), {"__module__": "somewhere.else"})


def test_unregistered_nested_dataclass_is_refused(tmp_path):
    @dataclasses.dataclass
    class Plain:
        x: int = 1

    res = EV.MethodEvaluation("m", _acc(1), {"plain": Plain()})
    with pytest.raises(TypeError, match=r"fluency\.plain.*not a registered Result"):
        res.save(tmp_path / "m")
    assert not (tmp_path / "m.json").exists()


def _saved(tmp_path, name="VADirections"):
    obj = BUILDERS[name](None)
    return obj, obj.save(tmp_path / name)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ResultFileMissing, match="nope.json"):
        CT.VADirections.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="missing"):  # ResultFileMissing is a FileNotFoundError
        D.EmotionDirections.load(tmp_path / "nope.safetensors")
    _, js = _saved(tmp_path)
    js.with_suffix(".safetensors").unlink()
    with pytest.raises(ResultFileMissing, match="VADirections.safetensors"):
        CT.VADirections.load(js)


def test_tampered_tensor_file_is_refused(tmp_path):
    obj, js = _saved(tmp_path)
    st = js.with_suffix(".safetensors")
    data = bytearray(st.read_bytes())
    data[-1] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(ResultFileError, match=r"VADirections\.safetensors.*hash"):
        CT.VADirections.load(js)
    # a tensor file from another save (valid safetensors, other values) is refused as well
    other = CT.VADirections(obj.vectors + 1, obj.layers, obj.method)
    other.save(tmp_path / "other")
    st.write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(ResultFileError, match="hash"):
        CT.VADirections.load(js)


def test_truncated_json_is_refused(tmp_path):
    _, js = _saved(tmp_path)
    js.write_text(js.read_text()[:-20])
    with pytest.raises(ResultFileError, match=r"VADirections\.json.*not a valid result file"):
        CT.VADirections.load(js)
    js.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ResultFileError, match="VADirections.json"):
        load_result(js)


def test_unknown_type_and_wrong_class_are_refused(tmp_path):
    _, js = _saved(tmp_path)
    doc = json.loads(js.read_text())
    with pytest.raises(ResultFileError, match=r"VADirections\.json.*holds a VADirections, not a EmotionCircuit"):
        CI.EmotionCircuit.load(js)
    assert isinstance(load_result(js), CT.VADirections)
    for t in ("NoSuchResult", "os.system", ["x"], None):
        (tmp_path / "u.json").write_text(json.dumps({**doc, "type": t}))
        with pytest.raises(ResultFileError, match=r"u\.json.*unknown result type"):
            load_result(tmp_path / "u.json")
    (tmp_path / "v.json").write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(ResultFileError, match=r"v\.json.*version 99"):
        load_result(tmp_path / "v.json")
    (tmp_path / "f.json").write_text(json.dumps({**doc, "format": "pickle"}))
    with pytest.raises(ResultFileError, match=r"f\.json.*not an emocircuits result"):
        load_result(tmp_path / "f.json")


def _crafted(tmp_path, body, name="crafted", tensors=None):
    doc = {"format": FORMAT, "type": body.get("__result__") if isinstance(body, dict) else "x",
           "version": 1, "body": body}
    if tensors is not None:
        doc["tensors"] = tensors
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(doc))
    return p


def test_crafted_json_executes_nothing(tmp_path, monkeypatch):
    import os
    import subprocess

    called = []
    monkeypatch.setattr(os, "system", lambda *a, **k: called.append(a))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: called.append(a))
    acc = {"__result__": "AccuracyTable", "fields": {"overall": 0.5, "n": 2, "by_emotion": {},
                                                       "by_valence": {}, "by_emotion_valence": {}}}
    bad_bodies = [
        {"__result__": "os.system", "fields": {"command": "touch pwned"}},
        {"__result__": "builtins.eval", "fields": {"source": "1"}},
        # a registered outer type with a foreign class nested inside
        {"__result__": "MethodEvaluation", "fields": {"method": "m", "accuracy": {
            "__result__": "subprocess.Popen", "fields": {"args": ["touch", "pwned"]}}, "fluency": {}}},
        # fields that are not the dataclass's (attribute injection) or not a mapping
        {**acc, "fields": {**acc["fields"], "__class__": {"__result__": "Probe", "fields": {}}}},
        {**acc, "fields": {**acc["fields"], "__dict__": {"x": 1}}},
        {**acc, "fields": ["overall", 0.5]},
        {"__result__": "AccuracyTable", "fields": {"overall": {"__tensor__": "nope"}}},
    ]
    for i, body in enumerate(bad_bodies):
        p = _crafted(tmp_path, body, f"c{i}")
        with pytest.raises(ResultFileError, match=rf"c{i}\.json"):
            load_result(p)
    # a probe state naming an sklearn class that is not one of the three
    st = {"__result__": "ProbeState", "fields": {"backend": "sklearn", "steps": [
        {"type": "Pipeline", "params": {"steps": []}, "fields": {}}]}}
    probe = {"__result__": "Probe", "fields": {"estimator": st, "classes": {"__tuple__": ["a"]}, "layer": 0}}
    with pytest.raises(ResultFileError, match=r"probe\.json"):
        load_result(_crafted(tmp_path, probe, "probe"))
    # tensor file entries cannot point outside the folder
    p = _crafted(tmp_path, acc, "t", tensors={"file": "../../etc/passwd", "sha256": "0"})
    with pytest.raises(ResultFileError, match=r"t\.json.*bad tensor file"):
        load_result(p)
    assert not called and not (tmp_path / "pwned").exists()
    # the well-formed body loads
    assert isinstance(load_result(_crafted(tmp_path, acc, "ok")), EV.AccuracyTable)


def test_colliding_field_paths_keep_both_tensors(tmp_path):
    a, b = _t(2, seed=1), _t(3, seed=2)
    res = PA.PatchingResult(_t(2, 2, seed=3), ("layer", "head"), [0, 1], 0.5, meta={"x.y": a, "x": {"y": b}})
    back = PA.PatchingResult.load(res.save(tmp_path / "p"))
    assert_same(res, back)


def test_hash_is_of_the_tensor_file(tmp_path):
    _, js = _saved(tmp_path, "EmotionCircuit")
    doc = json.loads(js.read_text())
    st = js.with_suffix(".safetensors")
    assert doc["tensors"]["file"] == st.name
    assert doc["tensors"]["sha256"] == hashlib.sha256(st.read_bytes()).hexdigest()
    # no tensors -> no tensor file (and a stale one is removed)
    st.write_bytes(b"stale")
    EV.FluencyResult([1.0], [0.0]).save(js)
    assert not st.exists() and "tensors" not in json.loads(js.read_text())
