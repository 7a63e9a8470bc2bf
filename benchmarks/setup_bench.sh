#!/usr/bin/env bash
# The peers of benchmarks/bench_peers.py, into the project's .venv (after ./setup.sh): nnsight
# (the `bench` extra) and steering-vectors (--no-deps: it declares transformers<5, and works
# with the pinned 5.23). torch and transformers are held at the project's pins. The tests do
# not need any of this.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run ./setup.sh first"; exit 1; }
PINS=$(mktemp)
trap 'rm -f "$PINS"' EXIT
.venv/bin/python - >"$PINS" <<'PY'
import importlib.metadata as m
for d in ("torch", "transformers"):
    print(f"{d}=={m.version(d)}")
PY
.venv/bin/python -m pip install -q -e ".[bench]" -c "$PINS"
.venv/bin/python -m pip install -q --no-deps "steering-vectors>=0.12"
echo "setup_bench: ok ($(.venv/bin/python -c 'import importlib.metadata as m; print("nnsight", m.version("nnsight"), "steering-vectors", m.version("steering-vectors"))'))"
