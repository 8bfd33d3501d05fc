"""Small flows with known answers: the closed-form Gaussian toy (method.md section 6)."""

from .gaussian import ClosedFormControl, GaussianToy, MLPControl, ToyControlledFlow
from .gaussian_fit import ControlError, control_error, simulated_mean_shift, train_toy_control, uniform_grid

__all__ = [
    "ClosedFormControl",
    "ControlError",
    "GaussianToy",
    "MLPControl",
    "ToyControlledFlow",
    "control_error",
    "simulated_mean_shift",
    "train_toy_control",
    "uniform_grid",
]
