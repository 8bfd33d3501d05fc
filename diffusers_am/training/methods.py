"""The fine-tuning methods, one :class:`Method` each, in one registry (:data:`METHODS`).

A method is its step function (:mod:`diffusers_am.objectives`: samples a batch, calls ``backward`` on its
loss, returns a ``StepOutput``), the keyword arguments the trainer passes it per micro-batch, the name the
model card shows, and the knobs it reads. Adding a method is one :func:`register_method` call (or one entry
here): the CLI's ``--method`` choices, the update, the log record and the model card all read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..objectives import draft_step, ode_am_step, refl_step, sde_am_step
from ..schedules import get_schedule
from .data import derive_seed

if TYPE_CHECKING:
    from .config import TrainingConfig

StepKwargs = Callable[..., dict[str, Any]]
"""``(config, k_steps, reward_scale, step, slot, device, backward) -> kwargs`` of a method's step function
for one micro-batch: ``step`` is the 0-based update, ``slot`` the micro-batch's global index
(process x accumulation), K and lambda as the run uses them (adaptive / matched ones included)."""


@dataclass(frozen=True)
class Method:
    """One fine-tuning method.

    Attributes:
        name: the ``--method`` value.
        display_name: what the model card calls it ("truncated deterministic adjoint matching").
        step: ``step(flow, noise, times, reward_fn, **kwargs) -> StepOutput``.
        step_kwargs: builds ``kwargs`` (see :data:`StepKwargs`), with any seeded generator it needs.
        control: which control the probes measure for it ("ode", "sde"), or None when it has none
            (then ``--truncate_steps auto`` and ``--match_reward_scale`` refuse it).
        uses_reg_order: whether ``--reg_order`` (the control cost's order p) changes it.
        single_step_profile: whether its control-norm profile has one entry (ReFL) instead of K.
    """

    name: str
    display_name: str
    step: Callable
    step_kwargs: StepKwargs
    control: str | None = None
    uses_reg_order: bool = False
    single_step_profile: bool = False

    def profile_length(self, k_steps: int) -> int:
        """Entries of the update record's ``control_norm_per_step``: 1 or K."""
        return 1 if self.single_step_profile else k_steps


def _base_kwargs(k_steps: int, reward_scale: float, backward: Callable) -> dict[str, Any]:
    return {"truncate_steps": k_steps, "reward_scale": reward_scale, "backward": backward}


def _ode_am_kwargs(cfg: TrainingConfig, k_steps, reward_scale, step, slot, device, backward) -> dict[str, Any]:
    kwargs = _base_kwargs(k_steps, reward_scale, backward)
    return {**kwargs, "order": cfg.reg_order, "loss_reduction": cfg.loss_reduction}


def _sde_am_kwargs(cfg: TrainingConfig, k_steps, reward_scale, step, slot, device, backward) -> dict[str, Any]:
    sde_gen = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, "sde", step, slot))
    return {
        **_base_kwargs(k_steps, reward_scale, backward),
        "schedule": get_schedule(cfg.sde_schedule, t_min=cfg.sde_t_min),
        "loss_reduction": cfg.loss_reduction,
        "generator": sde_gen,
    }


def _draft_kwargs(cfg: TrainingConfig, k_steps, reward_scale, step, slot, device, backward) -> dict[str, Any]:
    return _base_kwargs(k_steps, reward_scale, backward)


def _refl_kwargs(cfg: TrainingConfig, k_steps, reward_scale, step, slot, device, backward) -> dict[str, Any]:
    # one step index j per update, the same on every process and micro-batch
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "refl", step))
    return {**_base_kwargs(k_steps, reward_scale, backward), "generator": generator}


METHODS: dict[str, Method] = {}
"""``--method`` name -> :class:`Method`, in the order ``--help`` lists them."""


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS` (ValueError if its name is taken, unless ``replace``)."""
    if not isinstance(method, Method):
        raise ValueError(f"`method` must be a diffusers_am.training.methods.Method; got {type(method).__name__}.")
    if method.name in METHODS and not replace:
        raise ValueError(f"method {method.name!r} is already registered; pass replace=True to replace it.")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registered method (e.g. one a test added)."""
    METHODS.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The registered ``--method`` values."""
    return tuple(METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name``; ValueError listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"`--method` must be one of {', '.join(METHODS)}; got {name!r}.")
    return METHODS[name]


def methods_with_control() -> tuple[str, ...]:
    """Methods with a control to measure (``--truncate_steps auto``, ``--match_reward_scale``)."""
    return tuple(name for name, m in METHODS.items() if m.control is not None)


for _method in (
    Method("ode-am", "truncated deterministic adjoint matching", ode_am_step, _ode_am_kwargs, control="ode",
           uses_reg_order=True),
    Method("sde-am", "stochastic adjoint matching", sde_am_step, _sde_am_kwargs, control="sde"),
    Method("draft", "DRaFT-K", draft_step, _draft_kwargs),
    Method("refl", "ReFL-K", refl_step, _refl_kwargs, single_step_profile=True),
):
    register_method(_method)
