"""The pipeline: config, cache keys, resume after an exception and after a SIGKILL, dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from emocircuits import cli
from emocircuits import pipeline as P

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(**over) -> dict:
    cfg = P.load_preset("quick")
    cfg = P.apply_overrides(cfg, [
        "data.n_train=3", "data.n_validation=1", "data.n_test=1", "generation.max_new_tokens=3",
        "directions.keyword_control=false", "directions.n_folds=2",
        'run.emotions=["anger", "sadness", "happiness"]',
        *[f"{k}={v}" for k, v in over.items()]], model="tiny-llama")
    return P.validate_config(cfg)


# ----------------------------------------------------------------------------- config


def test_presets_load_and_validate():
    for name in ("quick", "full"):
        cfg = P.validate_config(P.load_preset(name))
        assert cfg["run"]["model"] == "smollm2-135m-instruct"
        assert cfg["run"]["preset"] == name
    q = P.load_preset("quick")["data"]
    assert q["n_train"] <= 8 and q["n_test"] <= 6 and P.load_preset("quick")["generation"]["max_new_tokens"] <= 32
    f = P.load_preset("full")["data"]
    assert (f["n_train"], f["n_validation"], f["n_test"]) == (160, 40, 40)


def test_overrides_and_errors(tmp_path):
    cfg = P.apply_overrides(P.load_preset("quick"), ["steering.alphas=[1.0, 2.0]", "data.n_test=2",
                                                     "run.dtype=bf16"], model="gemma-3-270m")
    assert cfg["steering"]["alphas"] == [1.0, 2.0] and cfg["data"]["n_test"] == 2
    assert cfg["run"]["model"] == "gemma-3-270m" and cfg["run"]["dtype"] == "bf16"
    with pytest.raises(P.PipelineError, match="section.key=value"):
        P.apply_overrides({}, ["nodot=1"])
    with pytest.raises(P.PipelineError, match="data.n_test"):
        P.validate_config(P.apply_overrides(P.load_preset("quick"), ["data.n_test=0"]))
    with pytest.raises(P.PipelineError, match="run.emotions"):
        P.validate_config(P.apply_overrides(P.load_preset("quick"), ['run.emotions=["anger"]']))
    with pytest.raises(FileNotFoundError, match="shipped presets"):
        P.load_preset("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nmodel=1")
    with pytest.raises(P.PipelineError, match="invalid TOML"):
        P.load_preset(bad)


def test_hashes_follow_the_dependency_graph():
    stages = P.default_stages()
    a = P.stage_hashes(stages, tiny_cfg())
    b = P.stage_hashes(stages, tiny_cfg(**{"directions.n_folds": 3}))
    assert a["judge"] == b["judge"] and a["prompting"] == b["prompting"]
    assert a["probes"] == b["probes"]
    for s in ("directions", "steering", "components", "circuits", "control"):
        assert a[s] != b[s], s
    c = P.stage_hashes(stages, tiny_cfg(**{"data.n_test": 2}))  # common section: everything
    assert all(a[s] != c[s] for s in a)
    assert P.stage_hashes(stages, tiny_cfg()) == a  # deterministic


def test_subset_records_round_robin_over_themes():
    from emocircuits.data import load_sev

    ds = load_sev("builtin:train")
    sub = P.subset_records(ds, 8)
    assert len(sub) == 8 and len({r.theme for r in sub}) == 8
    assert P.subset_records(ds, None) == list(ds)


# ----------------------------------------------------------------------------- resume


def _counting_stage(counter: dict, name: str, fail: bool = False):
    def fn(ctx):
        counter[name] = counter.get(name, 0) + 1
        x = ctx.upstream["directions"].artifacts["directions"].vectors["resid_post"]
        ctx.results["sum"] = float(x.double().sum())
        ctx.path("partial.txt").write_text("half done")
        if fail:
            raise RuntimeError("injected failure")
        ctx.artifacts["x"] = x * 2
    return fn


def test_resume_after_injected_exception_gives_identical_results(tiny_llama, tmp_path):
    cfg = tiny_cfg()
    dirs_stage = next(s for s in P.default_stages() if s.name == "directions")
    calls: dict = {}
    failing = [dirs_stage, P.Stage("after", _counting_stage(calls, "after", fail=True),
                                   requires=("directions",))]
    with pytest.raises(P.PipelineError, match="after.*injected failure"):
        P.run_pipeline(cfg, tmp_path / "run", stages=failing, keep_going=False, progress=False,
                       model=tiny_llama, report=False)
    stage_dirs = sorted(p.name for p in (tmp_path / "run" / "stages").iterdir())
    assert len(stage_dirs) == 1 and stage_dirs[0].startswith("directions-")  # no tmp left behind
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["stages"]["directions"]["status"] == "done"
    # resume: directions is cached, "after" reruns and succeeds
    ok = [dirs_stage, P.Stage("after", _counting_stage(calls, "after"), requires=("directions",))]
    r2 = P.run_pipeline(cfg, tmp_path / "run", stages=ok, progress=False, model=tiny_llama)
    assert r2.cached == ["directions"] and r2.ran == ["after"] and calls["after"] == 2
    # a fresh run from scratch gives the same numbers
    r3 = P.run_pipeline(cfg, tmp_path / "fresh", stages=ok, progress=False, model=tiny_llama,
                        report=False)
    assert r3.ran == ["directions", "after"]
    for s in ("directions", "after"):
        assert r2.results["stages"][s]["results"] == r3.results["stages"][s]["results"]
    a = P._load_record(tmp_path / "run", "after", r2.results["stages"]["after"]["config_hash"])
    b = P._load_record(tmp_path / "fresh", "after", r3.results["stages"]["after"]["config_hash"])
    assert torch.equal(a.artifacts["x"], b.artifacts["x"])
    # a third run does nothing
    r4 = P.run_pipeline(cfg, tmp_path / "run", stages=ok, progress=False, model=tiny_llama)
    assert r4.ran == [] and r4.cached == ["directions", "after"] and calls["after"] == 3
    assert (tmp_path / "run" / "report.html").exists()


_KILL_SCRIPT = """
import os, signal, sys
from emocircuits import pipeline as P

cfg = P.validate_config(P.apply_overrides(P.load_preset("quick"), [
    "data.n_train=3", "data.n_validation=1", "data.n_test=1", "directions.keyword_control=false",
    "directions.n_folds=2", 'run.emotions=["anger", "sadness", "happiness"]'], model="tiny-llama"))

def second(ctx):
    v = ctx.upstream["directions"].artifacts["directions"].vectors["resid_mid"]
    ctx.results["norms"] = v.norm(dim=-1).tolist()
    ctx.path("half.txt").write_text("x")
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # dies mid-stage, like a killed job

stages = [s for s in P.default_stages() if s.name == "directions"]
stages.append(P.Stage("second", second, requires=("directions",)))
r = P.run_pipeline(cfg, sys.argv[1], stages=stages, progress=False, report=False)
print("RAN", ",".join(r.ran), "CACHED", ",".join(r.cached))
"""


def test_killed_process_resumes_with_identical_results(tmp_path):
    script = tmp_path / "run_kill.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = tmp_path / "run"
    p1 = subprocess.run([sys.executable, str(script), str(run), "kill"], env=env,
                        capture_output=True, text=True, timeout=600)
    assert p1.returncode == -9, p1.stderr[-2000:]
    names = [p.name for p in (run / "stages").iterdir()]
    assert any(n.startswith("directions-") for n in names)
    assert any(n.startswith(".tmp-second-") for n in names)  # the half-written stage
    p2 = subprocess.run([sys.executable, str(script), str(run), "ok"], env=env,
                        capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0, p2.stderr[-2000:]
    assert "RAN second CACHED directions" in p2.stdout
    assert not any(n.startswith(".tmp-") for n in os.listdir(run / "stages"))
    p3 = subprocess.run([sys.executable, str(script), str(tmp_path / "fresh"), "ok"], env=env,
                        capture_output=True, text=True, timeout=600)
    assert "RAN directions,second" in p3.stdout
    d2 = json.loads((run / "results.json").read_text())["stages"]
    d3 = json.loads((tmp_path / "fresh" / "results.json").read_text())["stages"]
    for s in ("directions", "second"):
        assert d2[s]["results"] == d3[s]["results"]
        assert d2[s]["config_hash"] == d3[s]["config_hash"]


def test_unavailable_module_and_failures_are_recorded(tiny_llama, tmp_path):
    def boom(ctx):
        raise ValueError("bad things")

    stages = [P.Stage("ghost", lambda ctx: None, modules=("emocircuits._no_such_module",)),
              P.Stage("child", lambda ctx: None, requires=("ghost",)),
              P.Stage("boom", boom),
              P.Stage("fine", lambda ctx: ctx.results.update(x=1.5))]
    r = P.run_pipeline(tiny_cfg(), tmp_path, stages=stages, progress=False, model=tiny_llama)
    st = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert st["ghost"]["status"].startswith("unavailable: module emocircuits._no_such_module")
    assert st["child"]["status"].startswith("skipped: upstream ghost")
    assert st["boom"]["status"] == "failed: ValueError: bad things"
    assert st["fine"]["status"] == "done" and st["fine"]["results"] == {"x": 1.5}
    assert r.failed == ["boom"] and r.skipped == ["ghost", "child"] and r.ran == ["fine"]
    page = (tmp_path / "report.html").read_text()
    assert "failed: ValueError: bad things" in page


def test_jsonable_handles_tensors_nan_and_dataclasses():
    import numpy as np

    from emocircuits.evaluate import accuracy_table

    t = accuracy_table([{"emotion": "anger", "valence": "positive", "match": True}])
    out = P._jsonable({"a": torch.tensor([1.0, float("nan")]), "b": np.float32(2.5), "t": t,
                       "c": (np.int64(3), np.bool_(True))})
    assert out["a"] == [1.0, None] and out["b"] == 2.5 and out["c"] == [3, True]
    assert out["t"]["overall"] == 1.0
    json.dumps(out, allow_nan=False)


# ----------------------------------------------------------------------------- CLI


def test_cli_dry_run_prints_plan_and_cache_state(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--dry-run", "--model", "tiny-llama", "--out", str(out), "--set",
            "data.n_train=3", "--set", "data.n_test=1", "--set", "data.n_validation=1", "--set",
            "directions.keyword_control=false", "--set", "directions.n_folds=2"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    for s in ("judge", "prompting", "directions", "steering", "circuits", "views"):
        assert s in text
    assert "estimated total" in text and "train=3" in text and "to run" in text
    assert not out.exists()  # a dry run writes nothing
    # run the judge stage only, then the plan shows it cached
    assert cli.main(["judge", "--model", "tiny-llama", "--out", str(out), "--no-progress",
                     "--set", "data.n_train=3", "--set", "data.n_test=1", "--set",
                     "data.n_validation=1", "--set", "directions.keyword_control=false",
                     "--set", "directions.n_folds=2"]) == 0
    capsys.readouterr()
    assert cli.main(args) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert "cached" in lines["judge"] and "to run" in lines["directions"]


def test_cli_errors_are_clear(capsys):
    assert cli.main(["run", "--preset", "nope", "--dry-run"]) == 2
    assert "preset 'nope' not found" in capsys.readouterr().err
    assert cli.main(["stages"]) == 0
    assert "directions" in capsys.readouterr().out


@pytest.mark.slow
def test_every_default_stage_runs_on_a_tiny_model(tiny_llama, tmp_path):
    """The whole default pipeline end to end (tiny sizes): every stage done, report written."""
    cfg = tiny_cfg(**{"data.n_validation": 1, "steering.alphas": "[8.0]",
                      "probes.max_utterances": 48, "probes.zero_shot_n": 4,
                      "probes.persistence_n": 4, "probes.cv": 2, "control.levels": "[-1.0, 1.0]",
                      "control.n_scenarios": 1, "components.sweep_ks": "[1, 2]"})
    r = P.run_pipeline(cfg, tmp_path, progress=False, model=tiny_llama)
    st = r.results["stages"]
    bad = {k: v["status"] for k, v in st.items() if v["status"] != "done"}
    assert not bad, bad
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["stages"]["circuits"]["results"]["test_accuracy_summary"]["random_circuit_control_mean"] is not None
    assert "mean_spearman" in res["stages"]["components"]["results"]["attribution_vs_exact_head_ablation"]
    assert (tmp_path / "report.html").stat().st_size > 10_000
    summ = res["summary"]
    for k in ("judge_accuracy_on_builtin_utterance_labels", "prompting_accuracy", "steering_accuracy",
              "circuit_modulation_accuracy", "random_circuit_accuracy", "probe_peak_accuracy",
              "zero_shot_accuracy", "vocabulary_bias_accuracy", "head_attribution_vs_exact_spearman"):
        assert k in summ, k
    assert "Summary" in (tmp_path / "report.html").read_text()


@pytest.mark.slow
def test_tutorial_notebook_executes(tmp_path):
    """notebooks/tutorial.ipynb runs top to bottom (tiny model) with nbclient."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(ROOT / "notebooks" / "tutorial.ipynb", as_version=4)
    os.environ["EMOCIRCUITS_TUTORIAL_OUT"] = str(tmp_path / "run")
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.pop("EMOCIRCUITS_TUTORIAL_OUT", None)
    assert (tmp_path / "run" / "report.html").exists()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
