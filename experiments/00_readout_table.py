"""Load a model and print the logit emotion readout on a few SEV items (neutral prompts).

    python experiments/00_readout_table.py --model smollm2-135m-instruct --n 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import emocircuits as ec
from emocircuits.judges.readout import emotion_readout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="builtin:test")
    ap.add_argument("--n", type=int, default=4, help="scenarios (x 3 valences)")
    ap.add_argument("--prefix", default="I feel", help="assistant prefix ('' for none)")
    args = ap.parse_args()
    t = time.perf_counter()
    model = ec.load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t:.1f}s")
    recs = ec.data.load_sev(args.data)[: args.n]
    prompts = ec.data.neutral_prompts(model, recs, assistant_prefix=args.prefix or None)
    r = emotion_readout(model, prompts)
    share = r.share
    head = f"{'item':<22}{'valence':<10}" + "".join(f"{e[:9]:>10}" for e in r.emotions) + "   argmax"
    print("next-token share of each emotion's words (renormalised over emotions)")
    print(head)
    for p, row, lab in zip(prompts, share, r.labels, strict=False):
        print(f"{p.skeleton_id:<22}{p.valence:<10}" + "".join(f"{x:>10.3f}" for x in row) + f"   {lab}")
    v = r.valence_score()
    for val in ("positive", "neutral", "negative"):
        sel = np.array([p.valence == val for p in prompts])
        print(f"mean P(pos words) - P(neg words) on {val} events: {v[sel].mean():+.4f}")


if __name__ == "__main__":
    main()
