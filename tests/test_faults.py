"""The fault suite: broken caches, crafted files and bad settings are detected, named and never
executed; nothing stale is reused. (Run-folder faults — crafted pickles, broken output.json,
the run lock, data edits — are in test_pipeline.py and test_results.py; this file adds the
model cache, the report's file embedding and the remaining bad inputs.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from emocircuits import models
from emocircuits.model_cache import (
    MANIFEST,
    CacheRebuildWarning,
    ensure_built,
    stale_temporaries,
    verify,
)

# ----------------------------------------------------------------------------- model cache


@pytest.fixture
def builder(tiny_llama):
    """A build function writing the tiny Llama as an HF folder, counting its calls."""
    calls = []
    cfg, tok = models.hf_model_of(tiny_llama).config, tiny_llama.tokenizer

    def build(tmp: Path) -> None:
        calls.append(tmp)
        _fresh(cfg).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    build.calls = calls
    return build


def _fresh(cfg, seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _load(folder, build):
    return models.load_built(folder, build, architecture="LlamaForCausalLM")


def _logits(model):
    ids = model.tokenizer("a short test prompt", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids)[0, -1]


def test_cache_is_built_once_with_a_manifest_and_verified(builder, tmp_path):
    folder = tmp_path / "models" / "tiny-fp32"
    a = _load(folder, builder)
    assert len(builder.calls) == 1 and verify(folder) is None
    man = json.loads((folder / MANIFEST).read_text())
    assert "model.safetensors" in man["files"] and len(man["files"]["model.safetensors"]["sha256"]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheRebuildWarning)
        b = _load(folder, builder)
    assert len(builder.calls) == 1  # verified, not rebuilt
    torch.testing.assert_close(_logits(a), _logits(b), rtol=0, atol=0)
    assert not stale_temporaries(folder)


@pytest.mark.parametrize("damage", ["flip_weights", "truncate_weights", "delete_tokenizer", "garbage_config",
                                    "truncate_tokenizer", "no_manifest", "garbage_manifest"])
def test_corrupt_cache_is_named_and_rebuilt(builder, tmp_path, damage):
    folder = tmp_path / "models" / "tiny-fp32"
    ref = _logits(_load(folder, builder))
    w = folder / "model.safetensors"
    if damage == "flip_weights":  # same size, one byte changed deep inside the tensor data
        data = bytearray(w.read_bytes())
        data[len(data) // 2] ^= 0xFF
        w.write_bytes(bytes(data))
        named = "model.safetensors does not match its sha256"
    elif damage == "truncate_weights":
        with open(w, "r+b") as f:
            f.truncate(w.stat().st_size // 3)
        named = "model.safetensors has"
    elif damage == "delete_tokenizer":
        (folder / "tokenizer.json").unlink()
        named = "tokenizer.json is missing"
    elif damage == "garbage_config":
        (folder / "config.json").write_text("{not json")
        named = "config.json has"
    elif damage == "truncate_tokenizer":
        t = folder / "tokenizer.json"
        t.write_bytes(t.read_bytes()[:100])
        named = "tokenizer.json has"
    elif damage == "no_manifest":
        (folder / MANIFEST).unlink()
        named = "emocircuits-cache.json is missing"
    else:
        (folder / MANIFEST).write_text("[1, 2")
        named = "emocircuits-cache.json is unreadable"
    assert verify(folder) is not None
    with pytest.warns(CacheRebuildWarning, match=named) as rec:
        m = _load(folder, builder)
    assert str(folder) in str(rec[0].message)
    assert len(builder.calls) == 2 and verify(folder) is None
    torch.testing.assert_close(_logits(m), ref, rtol=0, atol=0)


def test_non_finite_weights_are_rebuilt_then_refused(tiny_llama, tmp_path):
    """A build that writes NaN weights: the finite-logit check rebuilds once, then refuses,
    naming the folder."""
    cfg, tok = models.hf_model_of(tiny_llama).config, tiny_llama.tokenizer
    calls = []

    def nan_build(tmp):
        calls.append(1)
        hf = _fresh(cfg)
        with torch.no_grad():
            hf.model.norm.weight.fill_(float("nan"))
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    folder = tmp_path / "nan-fp32"
    with pytest.warns(CacheRebuildWarning, match="not finite"):
        with pytest.raises(models.ModelLoadError, match=f"{folder}.*not finite"):
            _load(folder, nan_build)
    assert len(calls) == 2


def test_a_killed_conversion_leaves_no_temporary_and_the_next_load_builds(builder, tmp_path):
    """SIGKILL a process in the middle of a build: its temporary folder is removed by the next
    build of the same folder (under the folder's lock), the folder never half-exists, and a
    temporary of *another* folder is left alone."""
    folder = tmp_path / "models" / "tiny-fp32"
    other = tmp_path / "models" / "other-fp32.tmp-keepme"
    other.mkdir(parents=True)
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from emocircuits.model_cache import ensure_built
        def build(tmp):
            (tmp / "model.safetensors").write_bytes(b"partial" * 1000)
            print("building", flush=True)
            time.sleep(60)
        ensure_built(Path({str(folder)!r}), build)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "building"
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert len(stale_temporaries(folder)) == 1 and not folder.exists()
    _load(folder, builder)
    assert stale_temporaries(folder) == [] and verify(folder) is None
    assert other.is_dir()  # not ours: untouched


def test_a_second_process_waits_for_the_conversion_in_progress(builder, tmp_path):
    """Two conversions of one folder: the second waits on the lock and finds it built."""
    folder = tmp_path / "models" / "tiny-fp32"
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from emocircuits.model_cache import ensure_built
        def build(tmp):
            print("building", flush=True)
            time.sleep(3)
            (tmp / "x.bin").write_bytes(b"1234")
        ensure_built(Path({str(folder)!r}), build)
        print("done", flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "building"
    t = time.perf_counter()
    calls = []
    ensure_built(folder, lambda tmp: calls.append(tmp))
    assert calls == [] and time.perf_counter() - t > 1.0  # waited, then saw the finished build
    assert p.stdout.readline().strip() == "done" and p.wait(timeout=30) == 0
    assert (folder / "x.bin").read_bytes() == b"1234"


def test_a_build_that_fails_leaves_nothing(tmp_path):
    folder = tmp_path / "m"

    def bad(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_built(folder, bad)
    assert not folder.exists() and stale_temporaries(folder) == []
    with pytest.raises(RuntimeError, match="wrote no files"):
        ensure_built(folder, lambda tmp: None)


# ----------------------------------------------------------------------------- the LLM judge's key

KEY = "sk-test-SECRET-0123456789"


class _Recorder:
    """A local HTTP server answering every POST with ``respond(path) -> (status, headers, body)``
    and recording the headers it received."""

    def __init__(self, respond):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.seen: list[dict] = []

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length", 0) or 0)
                self.rfile.read(n)
                outer.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers)})
                status, headers, body = respond(self.path)
                data = body.encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET = _any  # noqa: N815

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _reply(content: str) -> str:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_llm_judge_never_follows_a_redirect_with_the_key(tmp_path, code, monkeypatch):
    from emocircuits.judges.llm import LLMJudge, LLMJudgeConfigError

    monkeypatch.delenv("EMOCIRCUITS_JUDGE_CACHE", raising=False)
    elsewhere = _Recorder(lambda path: (200, {}, _reply('{"match": 1, "reason": "ok"}')))
    origin = _Recorder(lambda path: (code, {"Location": elsewhere.url + "/v1/chat/completions"}, ""))
    try:
        judge = LLMJudge(base_url=origin.url + "/v1", api_key=KEY, cache=False, backoff=0.0, timeout=5.0)
        with pytest.raises(LLMJudgeConfigError, match=f"HTTP {code} redirecting to") as info:
            judge.judge(["I am furious."], ["anger"])
        assert elsewhere.url.split("//")[1] in str(info.value) and KEY not in str(info.value)
        assert elsewhere.seen == []  # the other host never saw a request, let alone the key
        assert origin.seen[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    finally:
        origin.close()
        elsewhere.close()


def test_llm_judge_scrubs_an_echoed_key_before_caching(tmp_path):
    from emocircuits.judges.llm import LLMJudge

    srv = _Recorder(lambda path: (200, {}, _reply(json.dumps({"match": 1, "reason": f"your key {KEY} is fine"}))))
    cache = tmp_path / "verdicts.sqlite"
    try:
        res = LLMJudge(base_url=srv.url + "/v1", api_key=KEY, cache=cache, backoff=0.0).judge(["Grr."], ["anger"])
        assert res.match == [True]
        assert KEY not in json.dumps(res.meta, default=str) and "***" in json.dumps(res.meta, default=str)
        import sqlite3

        con = sqlite3.connect(cache)
        dump = "\n".join(con.iterdump())
        con.close()
        assert KEY not in dump and "***" in dump
        assert KEY.encode() not in cache.read_bytes()
    finally:
        srv.close()


def test_llm_judge_cache_key_covers_endpoint_model_and_prompt_version(monkeypatch):
    from emocircuits.judges import llm
    from emocircuits.judges.llm import LLMJudge, build_messages

    msgs = build_messages("I am furious.", "anger")
    a = LLMJudge(base_url="http://127.0.0.1:9/v1", api_key=KEY, cache=False)
    b = LLMJudge(base_url="http://127.0.0.2:9/v1", api_key=KEY, cache=False)
    c = LLMJudge(base_url="http://127.0.0.1:9/v1", api_key=KEY, cache=False, model="other-model")
    keys = {a.cache_key(msgs), b.cache_key(msgs), c.cache_key(msgs)}
    assert len(keys) == 3
    before = a.cache_key(msgs)
    monkeypatch.setattr(llm, "PROMPT_VERSION", "paper-01-v2")
    assert a.cache_key(msgs) != before


# ----------------------------------------------------------------------------- bad settings and inputs


def _cli(*args):
    from emocircuits.cli import main

    return main(list(args))


@pytest.mark.parametrize("args,msg", [
    (["--set", "directions.pca_layers=[99]"], "directions.pca_layers: layer 99 out of range for a 30-layer model"),
    (["--set", "components.ablation_layers=[-31]"], "components.ablation_layers: layer -31 out of range"),
    (["--set", "steering.layer_bands=[[12, 40]]"], "steering.layer_bands: layer 40 out of range"),
    (["--model", "tiny-llama", "--set", "directions.pca_layers=[3]"], "for a 3-layer model"),
    (["--model", "no-such-model"], "run.model 'no-such-model': not a builtin model"),
])
@pytest.mark.parametrize("dry", [True, False])
def test_bad_settings_refused_before_any_model_load(args, msg, dry, tmp_path, capsys, monkeypatch):
    from emocircuits import models as M

    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(M, "tiny_model", lambda *a, **k: pytest.fail("a model was loaded"))
    rc = _cli("run", "--preset", "quick", "--out", str(tmp_path / "run"), *args, *(["--dry-run"] if dry else []))
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dry", [True, False])
def test_out_pointing_at_a_file_is_refused(tmp_path, capsys, dry):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    rc = _cli("run", "--preset", "quick", "--model", "tiny-llama", "--out", str(f), *(["--dry-run"] if dry else []))
    assert rc == 2 and "is a file: --out must name a folder" in capsys.readouterr().err
    assert f.read_text() == "mine"


def test_a_prompt_longer_than_the_context_is_refused_naming_the_record(tiny_llama):
    from emocircuits.activations import collect
    from emocircuits.data import load_sev
    from emocircuits.generation import generate
    from emocircuits.prompts import PromptTooLongError, emotion_prompts, tokenize

    rec = list(load_sev("builtin:train"))[0]
    huge = type(rec)(**{**rec.__dict__, "scenario": "word " * 5000})
    ps = emotion_prompts(tiny_llama, [huge], ["anger"])
    n_ctx = tiny_llama.cfg.n_ctx
    for call in (lambda: collect(tiny_llama, ps, ("resid_post",), "last", progress=False),
                 lambda: generate(tiny_llama, ps, progress=False, max_new_tokens=2),
                 lambda: tokenize(tiny_llama, ps)):
        with pytest.raises(PromptTooLongError, match=rf"record '{rec.skeleton_id}__\w+__anger' has \d+ tokens"
                                                     rf".*context is {n_ctx}"):
            call()
    # a prompt that fits alone but not with the tokens to generate
    ok = emotion_prompts(tiny_llama, [rec], ["anger"])[:1]
    n = len(tiny_llama.tokenizer(ok[0].text, add_special_tokens=False)["input_ids"])
    with pytest.raises(PromptTooLongError, match=rf"\+ {n_ctx - n + 1} to generate"):
        generate(tiny_llama, ok, progress=False, max_new_tokens=n_ctx - n + 1)
    with pytest.raises(PromptTooLongError, match=r"prompt 0 \('xx xx"):
        tokenize(tiny_llama, ["xx " * 3000])


def test_no_stray_generations_lock_and_a_second_writer_is_refused(tiny_llama, tmp_path):
    from emocircuits.data import load_sev
    from emocircuits.elicitation import ElicitationFileError, _exclusive, elicit

    recs = list(load_sev("builtin:train"))[:1]
    out = tmp_path / "gen.jsonl"
    from emocircuits.generation import GenerationConfig

    elicit(tiny_llama, recs, ["anger"], out, progress=False, batch_size=4,
           gen_config=GenerationConfig(max_new_tokens=2, min_new_tokens=0))
    assert out.is_file() and not (tmp_path / "gen.jsonl.lock").exists()
    with _exclusive(out):
        assert (tmp_path / "gen.jsonl.lock").exists()
        with pytest.raises(ElicitationFileError, match="another elicit"):
            with _exclusive(out):
                pass
    assert not (tmp_path / "gen.jsonl.lock").exists()


@pytest.mark.parametrize("dry", [True, False])
def test_missing_or_invalid_data_files_refused_before_load(tmp_path, capsys, dry, monkeypatch):
    from emocircuits import models as M

    monkeypatch.setattr(M, "tiny_model", lambda *a, **k: pytest.fail("a model was loaded"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"skeleton_id": "x"}\n')
    for src, msg in ((tmp_path / "nope.jsonl", "no such file"), (bad, "bad.jsonl:1: theme: missing")):
        rc = _cli("run", "--preset", "quick", "--model", "tiny-llama", "--out", str(tmp_path / "run"),
                  "--set", f'data.validation="{src}"', *(["--dry-run"] if dry else []))
        err = capsys.readouterr().err
        assert rc == 2 and "data.validation" in err and msg in err, err


def test_cli_prints_each_warning_once_on_one_line():
    import subprocess

    code = ("import warnings, emocircuits.cli as c; c._one_line_warnings()\n"
            "for _ in range(3): warnings.warn('budget takes most heads', UserWarning)\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr
    assert err == "warning (UserWarning): budget takes most heads\n"
