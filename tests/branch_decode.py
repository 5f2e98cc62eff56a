"""A check both runtimes' tests share: N branches decoded together against each alone."""

from __future__ import annotations

import numpy as np

TEXT = "function add(a, b) {\n    return a + b;\n}\nimport os\nimport sys\n"
STEPS = [[5, 9, 11], [12, 13, 14], [20, 21, 22]]  # three branches, three steps


def together_and_alone(rt) -> tuple[np.ndarray, list[np.ndarray]]:
    """The last logits (3, V) of three branches decoded in one batch, and of each decoded alone (V,)."""
    state, _ = rt.prefill(rt.tokenizer.encode(TEXT))
    br = rt.start_branches(state, len(STEPS[0]), 8)
    for toks in STEPS:
        together = rt.decode(state, br, toks)
    alone = []
    for b in range(len(STEPS[0])):
        single = rt.start_branches(state, 1, 8)
        for toks in STEPS:
            last = rt.decode(state, single, [toks[b]])
        alone.append(last[0])
    return together, alone
