"""Run one paper stage (or all) through the cached pipeline: a thin wrapper over the CLI.

    python experiments/run_stage.py all --model smollm2-135m-instruct --preset quick --out runs/quick
    python experiments/run_stage.py steering --model gemma-3-270m --out runs/gemma --set steering.alphas=[4.0,8.0]

STAGE is one of ``emocircuits stages`` or ``all``; every other argument goes to the CLI.
"""

from __future__ import annotations

import sys

from emocircuits.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0)
    stage, rest = sys.argv[1], sys.argv[2:]
    raise SystemExit(main(["run" if stage == "all" else stage, *rest]))
