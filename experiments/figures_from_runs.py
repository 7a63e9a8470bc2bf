"""Figures from the experiment results already on disk (no model is loaded).

    .venv/bin/python experiments/figures_from_runs.py --runs runs --out runs/figures

* ``probes_depth.png``: logistic-probe CV accuracy per layer against depth fraction, one line
  per model in ``runs/probes/*.json``, with chance (1/7) and each model's zero-shot accuracy;
* ``persistence.png``: the peak-layer probe's accuracy at generated position k (5-token moving
  mean) per model, with the accuracy on the openings themselves;
* ``<run folder>_<model>.png`` (e.g. ``circuits_smollm2-135m-instruct.png``): the headline table of ``06_circuits.py`` (judge and readout
  accuracy per method; the random circuit is the hatched control);
* ``control_<model>.png``: the method comparison of ``08_control.py``.

Missing inputs are skipped with a line on stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from emocircuits.viz import figures as F  # noqa: E402


def read_json(path: Path) -> dict:
    """The results file, or an error that names it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None


def probes(files: list[Path], out: Path) -> list[Path]:
    if not files:
        print("no runs/probes/*.json: probe figures skipped")
        return []
    res = [read_json(f) for f in files]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(res):
        sw = r["sweeps"]["logreg_last"]
        x = np.array([max(layer + 1, 0) / r["n_layers"] for layer in sw["layers"]])
        ax.plot(x, sw["accuracy_mean"], marker="o", ms=3, color=F._color(i), label=f"{r['model']} probe (CV)")
        if "zero_shot" in r:
            ax.axhline(r["zero_shot"]["accuracy"], color=F._color(i), ls="-.", lw=1,
                       label=f"{r['model']} zero-shot")
    chance = res[0]["sweeps"]["logreg_last"]["chance_uniform"]
    ax.axhline(chance, color="gray", ls=":", label=f"chance ({chance:.2f})")
    ax.set(xlabel="depth (0 = embedding, 1 = last layer)", ylabel="accuracy", ylim=(0, 1.02),
           title="emotion probe accuracy per layer (7 classes, group CV)")
    ax.legend(fontsize=7)
    paths = [F._save(fig, out / "probes_depth.png")]

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(res):
        p = r.get("persistence")
        if not p:
            continue
        y = np.array(p["transfer_accuracy"], dtype=float)
        ys = np.convolve(np.nan_to_num(y, nan=np.nanmean(y)), np.ones(5) / 5, mode="same")
        ax.plot(p["k"], ys, color=F._color(i), label=f"{r['model']} (layer {p['layer']}, n={p['n_openings']})")
        ax.axhline(p["reference_accuracy"], color=F._color(i), ls="--", lw=1,
                   label=f"{r['model']} on the openings")
    ax.axhline(chance, color="gray", ls=":", label="chance")
    ax.set(xlabel="generated token position k", ylabel="accuracy (5-token mean)", ylim=(0, 1.02),
           title="persistence: the opening's emotion read at generated position k")
    ax.legend(fontsize=7)
    paths.append(F._save(fig, out / "persistence.png"))
    return paths


def circuits(path: Path, out: Path) -> list[Path]:
    if not path.exists():
        print(f"no {path}: skipped")
        return []
    r = read_json(path)
    if "test" not in r:
        print(f"{path}: no test table yet")
        return []
    t = r["test"]
    main = {m: t[m]["accuracy"]["overall"] for m in t if m != "random_circuit"}
    ctrl = {"random circuit": t["random_circuit"]["accuracy"]["overall"]} if "random_circuit" in t else {}
    per = {m: t[m]["accuracy"]["by_emotion"] for m in t}
    model = r["args"]["model"]
    name = f"{path.parent.name}_{model}"  # one figure per run folder (runs/circuits, runs/circuits_b3, ...)
    return [F.method_comparison(main, out / f"{name}.png", controls=ctrl, per_emotion=per,
                                title=f"{path.parent.name} ({model}): judge accuracy on builtin:test")]


def control(path: Path, out: Path) -> list[Path]:
    if not path.exists():
        print(f"no {path}: skipped")
        return []
    r = read_json(path)
    comp = r.get("methods") or {}
    if not comp:
        print(f"{path}: no method comparison")
        return []
    acc = {m: v["judge_accuracy"] for m, v in comp.items()}
    per = {m: v["by_emotion"] for m, v in comp.items()}
    return [F.method_comparison(acc, out / f"control_{path.parent.name}.png", per_emotion=per,
                                title=f"{path.parent.name}: judge accuracy by control method")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--out", default="runs/figures")
    a = ap.parse_args()
    runs, out = Path(a.runs), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = probes(sorted((runs / "probes").glob("*.json")), out)
    for d in sorted(runs.glob("circuits*")):
        paths += circuits(d / "results.json", out)
    for d in sorted((runs / "control").glob("*/")):
        paths += control(d / "results.json", out)
    for p in paths:
        print("wrote", p)


if __name__ == "__main__":
    main()
