"""A2D, RND1's objective (eq. 2): output i predicts x0[i+1] wherever x_t[i+1] is masked, weight 1/t.

The AR head keeps its next-token meaning: a pretrained AR model already reads output i as "the
token after i", so converting it changes what it may attend to (bidirectional context, masks in
the input), not what its outputs mean. That is why a pretrained AR model converts so cheaply.
Position 0 is never masked: no output i = -1 could predict it.

Worked example, one row with t = 0.5::

    x0      = [A, B, C, D]
    x_t     = [A, M, C, M]          masked = [0, 1, 0, 1]   (position 0 is never masked)
    select  = [1, 0, 1, 0]          output 0 predicts B, output 2 predicts D
    targets = [B, ., D, .]          weights = [2, 0, 2, 0]
    scored  = positions 1..3 (3)    loss = (2 CE(B) + 2 CE(D)) / 3 per token

With weights 1/t the expected number of weighted masked positions equals the number of scored
positions, so a model predicting uniformly over V reads log V: the loss is the per-token
negative ELBO, an upper bound on the NLL per token.
"""

from __future__ import annotations

from rnd1.diffusion.objective import Objective


class A2D(Objective):
    name = "a2d"
    masks = True
    shift = 1
    attention = "bidirectional"
