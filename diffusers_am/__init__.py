"""diffusers-am: truncated deterministic adjoint matching for flow-matching pipelines.

The core math (``control``, ``adjoint``, ``schedules``, ``objectives``) is pure torch in
paper time (t = 0 noise, t = 1 data); model adapters under ``models/`` convert each
family's convention at the boundary.
"""

__version__ = "0.1.0"
