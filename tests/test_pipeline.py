"""The run engine and the studies: typed config, cache keys, resume (exception and SIGKILL),
the result contract in run folders, one run per folder, the CLI, experiment presets."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from emocircuits import cli
from emocircuits.results import Result
from emocircuits.run import ConfigError, RunError, RunLockedError, Study, stage_hashes
from emocircuits.run.engine import run_lock
from emocircuits.studies import STUDIES, get_study, load_config, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.n_train=3", "data.n_validation=1", "data.n_test=1", "generation.max_new_tokens=3",
        "generation.min_new_tokens=0", "directions.keyword_control=false", "directions.n_folds=2",
        'run.emotions=["anger", "sadness", "happiness"]']
TINY_ARGS = [a for o in TINY for a in ("--set", o)]


def tiny_cfg(*over: str):
    return load_config("quick", [*TINY, *over], model="tiny-llama")


# ----------------------------------------------------------------------------- config


def test_presets_parse_into_typed_sections():
    for name in ("quick", "full"):
        cfg = load_config(name)
        assert cfg.run.model == "smollm2-135m-instruct" and cfg.run.preset == name
        assert cfg.section("steering").strengths and isinstance(cfg.section("steering").strengths, tuple)
    q, f = load_config("quick").data, load_config("full").data
    assert q.n_train <= 8 and q.n_test <= 6
    assert (f.n_train, f.n_validation, f.n_test) == (160, 12, 40)  # grids on 12 of the 40 validation scenarios
    # every default is filled in and in config.json's dict
    d = load_config("quick").to_dict()
    assert set(d) == {"run", "data", "generation", "judge", *(s.name for s in STUDIES)}
    assert d["circuits"]["ppl_guard"] == 3.0


@pytest.mark.parametrize("override, message", [
    ("steering.alpahs=[2.0]", "unknown key 'alpahs'"),
    ("steering.strenghts=[2.0]", "did you mean 'strengths'"),
    ("steering.strengths=8", "steering.strengths: expected a list of numbers, got 8 (int)"),
    ("stering.strengths=[1.0]", "unknown section [stering] (did you mean [steering]?)"),
    ("circuits.lambdas=[\"a\"]", "circuits.lambdas: expected a list of numbers"),
    ("directions.keyword_control=1", "expected true or false"),
    ("generation.batch_size=-4", "batch_size must be >= 1"),
    ("data.n_test=0", "data.n_test must be a positive integer"),
    ('run.emotions=["anger"]', "run.emotions must list >= 2"),
    ('run.emotions=["anger", "joyy"]', "unknown emotion(s) ['joyy']"),
    ('run.dtype="fp33"', "run.dtype 'fp33'"),
    ('run.device="gpu"', "run.device 'gpu'"),
    ('judge.prefer="best"', "judge.prefer: expected one of"),
    ('run.stages=["nope"]', "unknown stage(s) ['nope']"),
    ("nodot=1", "section.key=value"),
])
def test_bad_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("quick", [override])
    assert message in str(e.value)


@pytest.mark.parametrize("dry", [True, False])
def test_cli_refuses_bad_settings_before_loading_a_model(dry, tmp_path, capsys, monkeypatch):
    from emocircuits.studies import common

    monkeypatch.setattr(common, "load_run_model", lambda *a, **k: pytest.fail("model loaded"))
    args = ["run", "--model", "tiny-llama", "--out", str(tmp_path / "r"),
            "--set", "steering.alpahs=[2.0]"] + (["--dry-run"] if dry else [])
    assert cli.main(args) == 2
    assert "unknown key 'alpahs'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_preset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped presets"):
        load_config("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nmodel=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_hashes_follow_the_dependency_graph_and_study_versions():
    a = stage_hashes(STUDIES, tiny_cfg())
    b = stage_hashes(STUDIES, tiny_cfg("directions.n_folds=3"))
    for s in ("judge_agreement", "prompting", "probes"):
        assert a[s] == b[s], s
    for s in ("directions", "steering", "components", "circuits", "control"):
        assert a[s] != b[s], s
    c = stage_hashes(STUDIES, tiny_cfg("data.n_test=2"))  # common section: everything
    assert all(a[s] != c[s] for s in a)
    assert stage_hashes(STUDIES, tiny_cfg()) == a  # deterministic
    # a default written out explicitly is the same config (hash after defaults)
    assert stage_hashes(STUDIES, tiny_cfg("circuits.ppl_guard=3.0")) == a
    # bumping one study's version invalidates it and what requires it
    from dataclasses import replace

    bumped = [replace(s, version=s.version + 1) if s.name == "directions" else s for s in STUDIES]
    d = stage_hashes(bumped, tiny_cfg())
    assert d["prompting"] == a["prompting"] and d["judge_agreement"] == a["judge_agreement"]
    assert d["directions"] != a["directions"] and d["steering"] != a["steering"]
    assert d["circuits"] != a["circuits"]


def test_data_file_contents_are_in_the_key(tmp_path):
    from emocircuits.data import load_sev, save_sev

    src = tmp_path / "train.jsonl"
    save_sev(list(load_sev("builtin:train"))[:6], src)
    cfg = tiny_cfg(f'data.train="{src}"')
    a = stage_hashes(STUDIES, cfg)
    text = src.read_text().replace("a ", "the ", 1)
    src.write_text(text)
    b = stage_hashes(STUDIES, cfg)
    assert a["directions"] != b["directions"] and a["prompting"] == b["prompting"]


def test_subset_records_round_robin_over_themes():
    from emocircuits.data import load_sev
    from emocircuits.studies.common import subset_records

    ds = load_sev("builtin:train")
    sub = subset_records(ds, 6)
    assert len(sub) == 6 and len({r.theme for r in sub}) == min(6, len({r.theme for r in ds}))
    assert subset_records(ds, None) == list(ds)


# ----------------------------------------------------------------------------- engine


@dataclass
class Numbers(Result):
    x: torch.Tensor
    note: str = ""


@dataclass(frozen=True)
class NoConfig:
    pass


def _after(calls: dict, fail: bool = False):
    def fn(ctx):
        calls["after"] = calls.get("after", 0) + 1
        if fail:
            raise RuntimeError("injected failure")
        v = ctx.upstream("directions").directions.vectors["resid_mid"]
        return Numbers(v.norm(dim=-1) * 2, "ok")
    return Study("after", "after", NoConfig, fn, requires=("directions",))


def test_resume_after_injected_exception_gives_identical_results(tiny_llama, tmp_path):
    cfg = tiny_cfg()
    dirs = get_study("directions")
    calls: dict = {}
    with pytest.raises(RunError, match="after.*injected failure"):
        run_pipeline(cfg, tmp_path / "run", studies=[dirs, _after(calls, fail=True)],
                     keep_going=False, progress=False, model=tiny_llama, report=False)
    names = sorted(p.name for p in (tmp_path / "run" / "stages").iterdir())
    assert len(names) == 1 and names[0].startswith("directions-")  # no tmp left behind
    assert not (tmp_path / "run" / ".lock").exists()
    ok = [dirs, _after(calls)]
    r2 = run_pipeline(cfg, tmp_path / "run", studies=ok, progress=False, model=tiny_llama)
    assert r2.cached == ["directions"] and r2.ran == ["after"] and calls["after"] == 2
    r3 = run_pipeline(cfg, tmp_path / "fresh", studies=ok, progress=False, model=tiny_llama, report=False)
    assert r3.ran == ["directions", "after"]
    for s in ("directions", "after"):
        assert r2.results["stages"][s]["results"] == r3.results["stages"][s]["results"]
    assert torch.equal(r2.result("after").x, r3.result("after").x)
    r4 = run_pipeline(cfg, tmp_path / "run", studies=ok, progress=False, model=tiny_llama)
    assert r4.ran == [] and r4.cached == ["directions", "after"] and calls["after"] == 3
    assert torch.equal(r4.result("after").x, r3.result("after").x)  # typed, from the folder
    assert (tmp_path / "run" / "report.html").exists()


def _checkpointed(calls: dict, fail_at: str | None = None):
    """A stage of three units of work, each a checkpoint; it raises before the unit ``fail_at``."""
    def fn(ctx):
        v = ctx.upstream("directions").directions.vectors["resid_mid"]
        out = []
        for k in ("a", "b", "c"):
            if k == fail_at:
                raise RuntimeError(f"stopped before {k}")

            def unit(k=k):
                calls[k] = calls.get(k, 0) + 1
                time.sleep(0.2)  # a measurable compute time, reported again when resumed
                return Numbers(v.norm(dim=-1) * (ord(k) - 96) + torch.rand(1), k)  # random: a rerun differs
            out.append(ctx.checkpoint(f"unit/{k}", unit))
        return Numbers(torch.cat([o.x for o in out]), ",".join(o.note for o in out))
    return Study("chk", "chk", NoConfig, fn, requires=("directions",))


def test_checkpoints_resume_an_interrupted_stage_without_recomputing(tiny_llama, tmp_path):
    cfg, dirs, calls = tiny_cfg(), get_study("directions"), {}
    with pytest.raises(RunError, match="stopped before c"):
        run_pipeline(cfg, tmp_path, studies=[dirs, _checkpointed(calls, fail_at="c")], keep_going=False,
                     progress=False, model=tiny_llama, report=False)
    partial = [p for p in (tmp_path / "stages").iterdir() if p.name.startswith(".partial-chk-")]
    assert len(partial) == 1 and len(list(partial[0].glob("unit_*.json"))) == 2  # a and b kept
    kept = json.loads((partial[0] / "seconds.json").read_text())
    assert sorted(k.split("-")[0] for k in kept) == ["unit_a", "unit_b"] and min(kept.values()) >= 0.2
    first_a = Numbers.load(next(partial[0].glob("unit_a-*.json"))).x
    r = run_pipeline(cfg, tmp_path, studies=[dirs, _checkpointed(calls)], progress=False,
                     model=tiny_llama, report=False)
    assert calls == {"a": 1, "b": 1, "c": 1}  # a and b loaded, not recomputed
    res = r.result("chk")
    assert res.note == "a,b,c" and torch.equal(res.x[: first_a.shape[0]], first_a)
    st = r.results["stages"]["chk"]
    assert "2 checkpoint(s)" in st["notes"]["resumed"]
    # seconds: this run (c only); compute_seconds adds what a and b took in the stopped run
    assert st["seconds"] < sum(kept.values()) + 0.2 <= st["compute_seconds"] + 0.01
    assert st["compute_seconds"] == pytest.approx(st["seconds"] + sum(kept.values()), abs=0.02)
    assert not any(p.name.startswith(".partial-") for p in (tmp_path / "stages").iterdir())
    with pytest.raises(RunError, match="not a Result"):
        bad = Study("bad", "bad", NoConfig, lambda ctx: ctx.checkpoint("x", lambda: {"x": 1}))
        run_pipeline(cfg, tmp_path / "b", studies=[bad], keep_going=False, progress=False,
                     model=tiny_llama, report=False)


def test_checkpoint_keys_that_differ_after_a_dot_stay_apart(tiny_llama, tmp_path):
    """"α=0.25" and "α=0.5" are two checkpoints, not one file "α=0.json" (Path.with_suffix)."""
    cfg, calls = tiny_cfg(), {}

    def fn(ctx):
        out = []
        for i, key in enumerate(("grid/α=0.25", "grid/α=0.5", "grid/α=0.5x")):
            def unit(i=i, key=key):
                calls[key] = calls.get(key, 0) + 1
                return Numbers(torch.full((2,), float(i)), key)
            out.append(ctx.checkpoint(key, unit))
        if fail["on"]:
            raise RuntimeError("stop after the grid")
        return Numbers(torch.cat([o.x for o in out]), ",".join(o.note for o in out))

    fail = {"on": True}
    study = Study("dots", "dots", NoConfig, fn)
    with pytest.raises(RunError, match="stop after the grid"):
        run_pipeline(cfg, tmp_path, studies=[study], keep_going=False, progress=False, model=tiny_llama,
                     report=False)
    partial = next(p for p in (tmp_path / "stages").iterdir() if p.name.startswith(".partial-dots-"))
    assert len(list(partial.glob("grid_*.json"))) == 3
    fail["on"] = False
    r = run_pipeline(cfg, tmp_path, studies=[study], progress=False, model=tiny_llama, report=False)
    assert calls == {"grid/α=0.25": 1, "grid/α=0.5": 1, "grid/α=0.5x": 1}  # each loaded, none mixed up
    res = r.result("dots")
    assert res.note == "grid/α=0.25,grid/α=0.5,grid/α=0.5x" and res.x.tolist() == [0, 0, 1, 1, 2, 2]


def test_config_or_version_change_reruns_exactly_that_stage_and_after(tiny_llama, tmp_path):
    from dataclasses import replace

    calls: dict = {}
    studies = [get_study("judge_agreement"), get_study("directions"), _after(calls)]
    r1 = run_pipeline(tiny_cfg(), tmp_path, studies=studies, progress=False, model=tiny_llama, report=False)
    assert r1.ran == ["judge_agreement", "directions", "after"]
    r2 = run_pipeline(tiny_cfg("directions.n_folds=3"), tmp_path, studies=studies, progress=False,
                      model=tiny_llama, report=False)
    assert r2.cached == ["judge_agreement"] and r2.ran == ["directions", "after"]
    bumped = [studies[0], studies[1], replace(studies[2], version=2)]
    r3 = run_pipeline(tiny_cfg("directions.n_folds=3"), tmp_path, studies=bumped, progress=False,
                      model=tiny_llama, report=False)
    assert r3.cached == ["judge_agreement", "directions"] and r3.ran == ["after"]


_PAYLOAD = """
import os
class Boom:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
"""


def test_a_crafted_pickle_in_a_run_folder_is_never_executed(tiny_llama, tmp_path):
    cfg = tiny_cfg()
    studies = [get_study("directions")]
    r = run_pipeline(cfg, tmp_path / "run", studies=studies, progress=False, model=tiny_llama, report=False)
    folder = r.records["directions"].dir
    marker = tmp_path / "pwned"
    ns: dict = {}
    exec(_PAYLOAD.format(marker=marker), ns)
    blob = pickle.dumps({"directions": ns["Boom"]()})
    # plant the pickle where the old layout read it, and as the result's tensor file
    (folder / "artifacts.pt").write_bytes(blob)
    (folder / "result.safetensors").write_bytes(blob)
    with pytest.warns(UserWarning, match="result.safetensors"):
        r2 = run_pipeline(cfg, tmp_path / "run", studies=studies, progress=False, model=tiny_llama,
                          report=False)
    assert not marker.exists()
    assert r2.ran == ["directions"]  # the broken stage was named and rebuilt
    # a result.json naming a type outside the registry is refused too
    doc = json.loads((r2.records["directions"].dir / "result.json").read_text())
    doc["body"]["__result__"] = "system"
    (r2.records["directions"].dir / "result.json").write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="result.json"):
        r3 = run_pipeline(cfg, tmp_path / "run", studies=studies, progress=False, model=tiny_llama,
                          report=False)
    assert r3.ran == ["directions"] and not marker.exists()


def test_output_json_of_another_stage_is_not_taken_as_cached(tiny_llama, tmp_path):
    studies = [get_study("judge_agreement")]
    r = run_pipeline(tiny_cfg(), tmp_path, studies=studies, progress=False, model=tiny_llama, report=False)
    p = r.records["judge_agreement"].dir / "output.json"
    out = json.loads(p.read_text())
    out["hash"] = "0" * 16
    p.write_text(json.dumps(out))
    with pytest.warns(UserWarning, match="output.json"):
        r2 = run_pipeline(tiny_cfg(), tmp_path, studies=studies, progress=False, model=tiny_llama,
                          report=False)
    assert r2.ran == ["judge_agreement"]


def test_one_run_per_folder(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunLockedError, match="in use by another emocircuits run"):
            run_pipeline(tiny_cfg(), tmp_path, studies=[get_study("judge_agreement")], progress=False,
                         report=False)
    assert not (tmp_path / ".lock").exists()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):  # refused before any work (check_before_work)
        run_pipeline(tiny_cfg(), f, studies=[get_study("judge_agreement")], progress=False, report=False)


_KILL_SCRIPT = """
import os, signal, sys
from dataclasses import dataclass
import torch
from emocircuits.results import Result
from emocircuits.run import Study
from emocircuits.studies import get_study, load_config, run_pipeline

cfg = load_config("quick", {tiny!r}, model="tiny-llama")

@dataclass
class Norms(Result):
    x: torch.Tensor

@dataclass(frozen=True)
class C:
    pass

def second(ctx):
    v = ctx.upstream("directions").directions.vectors["resid_mid"]
    ctx.path("half.txt").write_text("x")
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # dies mid-stage, like a killed job
    return Norms(v.norm(dim=-1))

studies = [get_study("directions"), Study("second", "second", C, second, requires=("directions",))]
r = run_pipeline(cfg, sys.argv[1], studies=studies, progress=False, report=False)
print("RAN", ",".join(r.ran), "CACHED", ",".join(r.cached))
"""


def test_killed_process_resumes_with_identical_results(tmp_path):
    script = tmp_path / "run_kill.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT.format(tiny=TINY)))
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
    assert p2.returncode == 0, p2.stderr[-2000:]  # the killed run's lock did not stay stuck
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

    studies = [Study("ghost", "ghost", NoConfig, lambda ctx: None, modules=("emocircuits._no_such_module",)),
               Study("child", "child", NoConfig, lambda ctx: None, requires=("ghost",)),
               Study("boom", "boom", NoConfig, boom),
               Study("fine", "fine", NoConfig, lambda ctx: Numbers(torch.ones(2) * 1.5)),
               Study("untyped", "untyped", NoConfig, lambda ctx: {"x": 1})]
    r = run_pipeline(tiny_cfg(), tmp_path, studies=studies, progress=False, model=tiny_llama)
    st = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert st["ghost"]["status"].startswith("unavailable: module emocircuits._no_such_module")
    assert st["child"]["status"].startswith("skipped: upstream ghost")
    assert st["boom"]["status"] == "failed: ValueError: bad things"
    assert st["untyped"]["status"].startswith("failed: RunError: stage 'untyped' returned dict")
    assert st["fine"]["status"] == "done" and st["fine"]["results"]["x"] == [1.5, 1.5]
    assert r.failed == ["boom", "untyped"] and r.skipped == ["ghost", "child"] and r.ran == ["fine"]
    assert "failed: ValueError: bad things" in (tmp_path / "report.html").read_text()


# ----------------------------------------------------------------------------- CLI


def test_cli_dry_run_prints_plan_and_cache_state(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--dry-run", "--model", "tiny-llama", "--out", str(out), *TINY_ARGS]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    for s in STUDIES:
        assert s.name in text
    assert "estimated total" in text and "train=3" in text and "to run" in text
    assert not out.exists()  # a dry run writes nothing
    assert cli.main(["judge_agreement", "--model", "tiny-llama", "--out", str(out), "--no-progress",
                     *TINY_ARGS]) == 0
    capsys.readouterr()
    assert cli.main(args) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert "cached" in lines["judge_agreement"] and "to run" in lines["directions"]
    # --timing: the finished stage's measured seconds (from its output.json) beside its estimate
    out_json = next((out / "stages").glob("judge_agreement-*/output.json"))
    doc = json.loads(out_json.read_text())
    doc["compute_seconds"] = 1234.0
    out_json.write_text(json.dumps(doc))
    assert cli.main([*args, "--timing"]) == 0
    text = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.strip()}
    assert "1234s" in lines["judge_agreement"] and lines["directions"].split()[7:9] == ["-", "-"]
    assert "finished stages: estimated" in text and "measured 1234 s" in text
    out_json.write_text("{broken")
    assert cli.main([*args, "--timing"]) == 2
    assert "output.json: no readable seconds" in capsys.readouterr().err


def test_cli_errors_and_version(capsys):
    assert cli.main(["run", "--preset", "nope", "--dry-run"]) == 2
    assert "preset 'nope' not found" in capsys.readouterr().err
    assert cli.main(["stages"]) == 0
    assert "directions" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert "emocircuits 0." in capsys.readouterr().out


def _untimed(x):
    """A results dict without wall-clock entries (the only thing two identical runs differ in)."""
    import re

    timing = re.compile(r"(^|_)(seconds|s|timing|time|times)($|_)")
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if not timing.search(k)}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def test_an_experiment_preset_and_the_cli_give_bit_identical_results(tiny_llama, tmp_path):
    """experiments/06_circuits.toml through the CLI == the same preset through run_pipeline."""
    preset = ROOT / "experiments" / "06_circuits.toml"
    over = [*TINY, "circuits.lambdas=[1.0]", "circuits.budgets=[3]", "steering.strengths=[1.0]", "circuits.random_controls=1",
            "circuits.faithfulness=false", "data.n_validation=1"]
    assert cli.main(["run", "--preset", str(preset), "--model", "tiny-llama", "--out", str(tmp_path / "cli"),
                     "--no-progress", "--no-report", *[a for o in over for a in ("--set", o)]]) == 0
    cfg = load_config(preset, over, model="tiny-llama")
    r = run_pipeline(cfg, tmp_path / "api", progress=False, report=False, model=tiny_llama)
    assert "circuits" in r.ran
    a = json.loads((tmp_path / "cli" / "results.json").read_text())["stages"]
    b = r.results["stages"]
    assert a.keys() == b.keys()
    for s in a:
        assert a[s]["config_hash"] == b[s]["config_hash"], s
        assert _untimed(a[s]["results"]) == _untimed(b[s]["results"]), s
        fa = (tmp_path / "cli" / a[s]["folder"] / "result.safetensors")
        fb = (tmp_path / "api" / b[s]["folder"] / "result.safetensors")
        assert fa.exists() == fb.exists() and (not fa.exists() or fa.read_bytes() == fb.read_bytes()), s


@pytest.mark.slow
def test_every_default_stage_runs_on_a_tiny_model(tiny_llama, tmp_path):
    """The whole default pipeline end to end (tiny sizes): every stage done, report written,
    every stage's typed result reloads from its folder."""
    cfg = tiny_cfg("steering.strengths=[1.0, 2.0]", "circuits.lambdas=[1.0, 2.0]",
                   "probes.max_utterances=48", "probes.zero_shot_n=4", "probes.persistence_n=4",
                   "probes.cv=2", "control.levels=[-1.0, 1.0]", "control.n_scenarios=1",
                   "components.sweep_ks=[1, 2]")
    r = run_pipeline(cfg, tmp_path, progress=False, model=tiny_llama)
    bad = {k: v["status"] for k, v in r.results["stages"].items() if v["status"] != "done"}
    assert not bad, bad
    from emocircuits.results import load_result

    for name, rec in r.records.items():
        back = load_result(rec.dir / "result")
        assert type(back).__name__ == rec.output["result_type"], name
    circ = r.result("circuits")
    assert circ.chosen["chosen_on"] == "validation" and len(circ.grid) == 3
    assert {"none", "prompting", "steering", "circuit", "random circuit 0"} <= set(circ.evaluations)
    summ = r.results["summary"]
    for k in ("judge_accuracy_on_builtin_utterance_labels", "prompting_accuracy", "steering_accuracy",
              "circuit_modulation_accuracy", "random_circuit_accuracy", "probe_peak_accuracy",
              "zero_shot_accuracy", "vocabulary_bias_accuracy", "head_attribution_vs_exact_spearman"):
        assert k in summ, k
    assert summ["circuit_modulation_accuracy"] == circ.evaluations["circuit"].accuracy.overall
    assert (tmp_path / "report.html").stat().st_size > 10_000
    # figures comparing run folders, from the typed results on disk
    assert cli.main(["figures", str(tmp_path), "--out", str(tmp_path / "figs")]) == 0
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {"probes_depth.png", f"{tmp_path.name}_methods.png"} <= names


def test_shared_train_activations_give_the_same_stage_results_with_fewer_forwards(tiny_llama, tmp_path):
    """directions → components → circuits with one shared last-token collection (default) equal
    the same stages each collecting their own (run.share_activations = false)."""
    from emocircuits.activations import Activations

    studies = [get_study(n) for n in ("directions", "components", "circuits")]
    over = ["circuits.random_controls=1", "circuits.faithfulness=false"]
    on = run_pipeline(tiny_cfg(*over), tmp_path / "on", studies=studies, progress=False, model=tiny_llama,
                      report=False)
    off = run_pipeline(tiny_cfg(*over, "run.share_activations=false"), tmp_path / "off", studies=studies,
                       progress=False, model=tiny_llama, report=False)
    shared = list((tmp_path / "on" / "shared").glob("train-last-*.json"))
    assert len(shared) == 1 and not (tmp_path / "off" / "shared").exists()
    assert set(Activations.load(shared[0]).acts) >= {"mlp_post", "z", "resid_mid", "resid_post"}
    for name in ("directions", "components", "circuits"):  # same key: the flag is not hashed
        assert on.results["stages"][name]["config_hash"] == off.results["stages"][name]["config_hash"]
    a, b = on.result("components"), off.result("components")
    assert torch.allclose(a.neurons.C_mean, b.neurons.C_mean, atol=1e-5)
    assert torch.allclose(a.heads_exact.mean, b.heads_exact.mean, atol=1e-5)
    ca, cb = on.result("circuits"), off.result("circuits")
    assert torch.allclose(ca.difference_vectors.mlp, cb.difference_vectors.mlp, atol=1e-5)
    assert {e: c.n_heads for e, c in ca.circuits.items()} == {e: c.n_heads for e, c in cb.circuits.items()}
