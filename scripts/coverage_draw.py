"""The coverage study's pre-registered sample: two tasks per suite, drawn once with a fixed seed, before any run.

    python scripts/coverage_draw.py            # writes docs/coverage/draw.json (committed before the first run)
    python scripts/coverage_draw.py --check    # fails if the committed draw is not what this script draws

Candidates: the tasks the scripted expert solves at >= 80 % of the protocol's 50 init states
(docs/scripted_expert_table.md, ``scripted_expert.listed_tasks``: the expert makes the DART demonstrations of the
BC start), less the seven tasks diffusion PPO had already run on when the study was registered (LIBERO-Object 0 and
1, LIBERO-Spatial 0, LIBERO-Goal 1, 6, 7 and 8: the recipe was tuned on some of them). Per suite, two of the
candidates are drawn without replacement by ``numpy.random.default_rng(SEED)``, suite after suite in the benchmark's
order. The runs go in the draw's order: the first task of every suite, then the second of every suite.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import libero_env as le  # noqa: E402
import scripted_expert  # noqa: E402

SEED = 20261207  # the registration date
PER_SUITE = 2
ALREADY_RUN = (("libero_object", 0), ("libero_object", 1), ("libero_spatial", 0), ("libero_goal", 1),
               ("libero_goal", 6), ("libero_goal", 7), ("libero_goal", 8))  # fmt: skip
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "coverage", "draw.json")


def draw() -> dict:
    listed = scripted_expert.listed_tasks()
    rng = np.random.default_rng(SEED)
    candidates, drawn = {}, {}
    for suite in le.SUITES:
        ids = [t.local_id for t in listed if t.suite == suite and (suite, t.local_id) not in ALREADY_RUN]
        candidates[suite] = ids
        drawn[suite] = sorted(int(i) for i in rng.choice(ids, PER_SUITE, replace=False))
    order = [f"{suite}:{drawn[suite][k]}" for k in range(PER_SUITE) for suite in le.SUITES]
    return {"seed": SEED, "per_suite": PER_SUITE, "excluded": [f"{s}:{i}" for s, i in ALREADY_RUN],
            "candidates": candidates, "drawn": drawn, "order": order,
            "instructions": {spec: le.resolve_task(spec.split(":")[0], int(spec.split(":")[1])).instruction
                             for spec in order}}  # fmt: skip


if __name__ == "__main__":
    result = draw()
    if "--check" in sys.argv:
        with open(OUT) as f:
            committed = json.load(f)
        if committed != result:
            sys.exit(f"error: {OUT} is not this script's draw; the sample is pre-registered, do not redraw it.")
        print("the committed draw is this script's")
        sys.exit(0)
    if os.path.exists(OUT):
        sys.exit(f"error: {OUT} exists; the sample is drawn once (use --check to verify it).")
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps(result["order"]))
