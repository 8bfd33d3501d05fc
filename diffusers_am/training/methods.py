"""The fine-tuning methods, one :class:`Method` each, in one registry (:data:`METHODS`).

A method is its step function (:mod:`diffusers_am.objectives`: samples a batch, calls ``backward`` on its
loss, returns a ``StepOutput``), the options it reads from the config (built once at set-up), the seeded
generators it draws per micro-batch, the name the model card shows, and the control the probes measure.
Adding a method is one :func:`register_method` call (or one entry here): the CLI's ``--method`` choices, the
update, the log record and the model card all read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..checks import one_of
from ..errors import UserError
from ..objectives import draft_step, ode_am_step, refl_step, sde_am_step
from ..prompts import derive_seed
from ..schedules import get_schedule


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    Attributes:
        name: the ``--method`` value.
        display_name: what the model card calls it ("truncated deterministic adjoint matching").
        step: ``step(flow, noise, times, reward_fn, *, truncate_steps, reward_scale, backward, **options,
            **draws) -> StepOutput`` (K and lambda by name, as the run uses them: adaptive / matched ones included).
        options: ``options(config) -> dict``: the step's keyword arguments that are fixed for the run (built once
            at set-up by :func:`step_options`; ``config`` is a :class:`~.config.TrainingConfig`).
        draws: ``draws(seed, step, slot, device) -> dict``: the seeded generators of one micro-batch (``step`` the
            0-based update, ``slot`` the micro-batch's global index: process x accumulation), or None.
        control: which control the probes measure for it ("ode", "sde"), or None when it has none
            (then ``--truncate_steps auto`` and ``--match_reward_scale`` refuse it).
        uses_reg_order: whether ``--reg_order`` (the control cost's order p) changes it.
        single_step_profile: whether its control-norm profile has one entry (ReFL) instead of K.
    """

    name: str
    display_name: str
    step: Callable
    options: Callable[[Any], dict[str, Any]]
    draws: Callable[[int, int, int, torch.device], dict[str, Any]] | None = None
    control: str | None = None
    uses_reg_order: bool = False
    single_step_profile: bool = False

    def profile_length(self, truncate_steps: int) -> int:
        """Entries of the update record's ``control_norm_per_step``: 1 or K."""
        return 1 if self.single_step_profile else truncate_steps


def step_options(method: Method, config: Any) -> dict[str, Any]:
    """The keyword arguments of ``method.step`` fixed for the run (with ``--micro_batch_size``), built once."""
    options = dict(method.options(config))
    if config.micro_batch_size is not None:
        options["micro_batch_size"] = config.micro_batch_size
    return options


def _no_options(config: Any) -> dict[str, Any]:
    return {}


def _ode_am_options(config: Any) -> dict[str, Any]:
    return {"order": config.reg_order, "loss_reduction": config.loss_reduction}


def _sde_am_options(config: Any) -> dict[str, Any]:
    schedule = get_schedule(config.sde_schedule, t_min=config.sde_t_min)
    return {"schedule": schedule, "loss_reduction": config.loss_reduction}


def _sde_am_draws(seed: int, step: int, slot: int, device: torch.device) -> dict[str, Any]:
    return {"generator": torch.Generator(device=device).manual_seed(derive_seed(seed, "sde", step, slot))}


def _refl_draws(seed: int, step: int, slot: int, device: torch.device) -> dict[str, Any]:
    # one step index j per update, the same on every process and micro-batch
    return {"generator": torch.Generator().manual_seed(derive_seed(seed, "refl", step))}


METHODS: dict[str, Method] = {}
"""``--method`` name -> :class:`Method`, in the order ``--help`` lists them."""


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS` (ValueError if its name is taken, unless ``replace``)."""
    if not isinstance(method, Method):
        raise UserError(f"`method` must be a diffusers_am.training.methods.Method; got {type(method).__name__}.")
    if method.name in METHODS and not replace:
        raise UserError(f"method {method.name!r} is already registered; pass replace=True to replace it.")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (e.g. one a test added)."""
    METHODS.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The registered ``--method`` values."""
    return tuple(METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name``; a UserError listing the known ones."""
    return METHODS[one_of(name, "--method", METHODS)]


def methods_with_control() -> tuple[str, ...]:
    """Methods with a control to measure (``--truncate_steps auto``, ``--match_reward_scale``)."""
    return tuple(name for name, m in METHODS.items() if m.control is not None)


for _method in (
    Method("ode-am", "truncated deterministic adjoint matching", ode_am_step, _ode_am_options, control="ode",
           uses_reg_order=True),
    Method("sde-am", "stochastic adjoint matching", sde_am_step, _sde_am_options, _sde_am_draws, control="sde"),
    Method("draft", "DRaFT-K", draft_step, _no_options),
    Method("refl", "ReFL-K", refl_step, _no_options, _refl_draws, single_step_profile=True),
):
    register_method(_method)
