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
from emocircuits.model_cache import MANIFEST, CacheRebuildWarning, ensure_built, stale_temporaries, verify

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
