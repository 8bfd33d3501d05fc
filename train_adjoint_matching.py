#!/usr/bin/env python
"""Fine-tune a flow-matching pipeline toward a reward with truncated adjoint matching.

    accelerate launch train_adjoint_matching.py            # the default: ODE-AM on the embedded digits base
    python train_adjoint_matching.py --config examples/digits_default.yaml --max_train_steps 100

A thin wrapper kept at the top level for ``accelerate launch train_adjoint_matching.py``; the entry
point itself is :func:`diffusers_am.train.main` (also ``python -m diffusers_am.train`` and the
console script ``diffusers-am-train`` of an installed package).
"""

from __future__ import annotations

import sys

from diffusers_am.train import main

if __name__ == "__main__":
    sys.exit(main())
