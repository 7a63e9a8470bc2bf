"""Figures that compare finished run folders (no model is loaded).

``figures_from_runs(run_dirs, out)`` writes, from the typed results in the run folders:

* ``probes_depth.png``: probe accuracy per layer against depth, one line per run with a
  probes stage, with chance and each run's zero-shot accuracy;
* ``persistence.png``: the peak-layer probe's accuracy at generated position k (5-token
  moving mean) per run, with its accuracy on the openings themselves;
* ``<run>_fluent.png``: fluent accuracy per method with 95 % intervals over scenarios (and
  raw judge accuracy) of a run with a circuits stage;
* ``<run>_methods.png``: the same run's raw judge accuracy per method and emotion (the random
  circuits are the hatched control).

CLI: ``emocircuits figures runs/quick runs/circuits --out runs/figures``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..run.engine import open_run
from . import figures as F


def figures_from_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> list[Path]:
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {Path(d).name: open_run(d) for d in run_dirs}
    paths: list[Path] = []
    probes = {n: r["probes"].result for n, r in runs.items() if "probes" in r}
    if probes:
        fig, ax = plt.subplots(figsize=(7, 4))
        chance = None
        for i, (name, pr) in enumerate(probes.items()):
            sw = pr.sweep
            x = np.array([max(layer + 1, 0) / sw.n_layers for layer in sw.layers])
            ax.plot(x, sw.accuracy_mean, marker="o", ms=3, color=F.palette_color(i), label=f"{name} probe (CV)")
            if pr.zero_shot is not None:
                ax.axhline(pr.zero_shot.accuracy, color=F.palette_color(i), ls="-.", lw=1, label=f"{name} zero-shot")
            chance = sw.chance_uniform
        ax.axhline(chance, color="gray", ls=":", label=f"chance ({chance:.2f})")
        ax.set(xlabel="depth (0 = embedding, 1 = last layer)", ylabel="probe accuracy", ylim=(0, 1.02),
               title="emotion probe accuracy per layer (group CV)")
        ax.legend(fontsize=7)
        paths.append(F.save_figure(fig, out / "probes_depth.png"))
        pers = {n: p.persistence for n, p in probes.items() if p.persistence is not None
                and p.persistence.transfer_accuracy is not None}
        if pers:
            fig, ax = plt.subplots(figsize=(7, 4))
            for i, (name, p) in enumerate(pers.items()):
                y = np.asarray(p.transfer_accuracy, dtype=float)
                ys = np.convolve(np.nan_to_num(y, nan=np.nanmean(y)), np.ones(5) / 5, mode="same")
                ax.plot(p.k, ys, color=F.palette_color(i), label=f"{name} (layer {p.layer})")
                if p.reference_accuracy is not None:
                    ax.axhline(p.reference_accuracy, color=F.palette_color(i), ls="--", lw=1,
                               label=f"{name} on the openings")
            ax.axhline(chance, color="gray", ls=":", label="chance")
            ax.set(xlabel="generated token position k", ylabel="probe accuracy (5-token mean)",
                   ylim=(0, 1.02), title="persistence: the opening's emotion read at position k")
            ax.legend(fontsize=7)
            paths.append(F.save_figure(fig, out / "persistence.png"))
    for name, r in runs.items():
        if "circuits" not in r:
            continue
        res = r["circuits"].result
        if getattr(res, "comparison", None) is not None and res.comparison.table:
            paths.append(F.fluent_comparison(res.comparison.table, out / f"{name}_fluent.png",
                                             title=f"{name}: fluent accuracy on the test split"))
        ev = res.evaluations
        main = {m: v.accuracy.overall for m, v in ev.items() if not m.startswith("random")}
        rnd = [v.accuracy.overall for m, v in ev.items() if m.startswith("random")]
        ctrl = {"random circuit": float(np.mean(rnd))} if rnd else {}
        paths.append(F.method_comparison(main, out / f"{name}_methods.png", controls=ctrl,
                                         per_emotion={m: v.accuracy.by_emotion for m, v in ev.items()
                                                      if m in main},
                                         title=f"{name}: judge accuracy on the test split"))
    return paths
