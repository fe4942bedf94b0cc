"""MDLM (RND1 eq. 1): output i predicts x0[i] wherever x_t[i] is masked, weight 1/t.

The classic masked-diffusion objective: the model reads its own position. Every position may be
masked and is scored, so the per-token NELBO divides by L per row. Converting an AR model this
way also changes what each output means (next token -> this token), which A2D avoids.
"""

from __future__ import annotations

from rnd1.diffusion.objective import Objective


class MDLM(Objective):
    name = "mdlm"
    masks = True
    shift = 0
    attention = "bidirectional"
