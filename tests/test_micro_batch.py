"""--micro_batch_size: the micro-batched adjoint / loss steps give the whole batch's gradient."""

import pytest
import torch

from diffusers_am.models import EMBEDDED_DIGITS_BASE, LoraSettings, load_model_adapter
from diffusers_am.objectives import draft_step, ode_am_step, refl_step, sde_am_step
from diffusers_am.rewards import load_reward
from diffusers_am.schedules import MemorylessSchedule
from diffusers_am.training.config import TrainingConfig
from diffusers_am.training.update import BatchReward

BATCH, N, K = 5, 4, 2


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    adapter = load_model_adapter(str(EMBEDDED_DIGITS_BASE))
    params = adapter.add_lora(LoraSettings(rank=2, init_lora_weights="gaussian"))
    reward = load_reward("digits")
    return adapter, params, reward


def _grads(setup, step_fn, micro, **kwargs):
    adapter, params, reward = setup
    for p in params:
        p.grad = None
    labels = [0, 3, 7, 1, 9]
    flow = adapter.flow(adapter.encode_conditions(labels))
    noise = adapter.initial_noise(BATCH, adapter.default_resolution, torch.Generator().manual_seed(1))
    times = adapter.time_grid(N, adapter.default_resolution)
    out = step_fn(flow, noise, times, BatchReward(reward, adapter.decode, labels), truncate_steps=K,
                  reward_scale=10.0, micro_batch_size=micro, **kwargs)
    return torch.cat([p.grad.reshape(-1) for p in params]), out


@pytest.mark.parametrize("name", ["ode-am", "sde-am", "draft", "refl"])
def test_micro_batches_give_the_whole_batch_gradient(setup, name):
    step_fn = {"ode-am": ode_am_step, "sde-am": sde_am_step, "draft": draft_step, "refl": refl_step}[name]

    def kwargs():  # the same random draws for both runs
        if name == "sde-am":
            return {"schedule": MemorylessSchedule(), "generator": torch.Generator().manual_seed(2)}
        if name == "refl":
            return {"generator": torch.Generator().manual_seed(2)}
        return {}

    whole, out_whole = _grads(setup, step_fn, None, **kwargs())
    parts, out_parts = _grads(setup, step_fn, 2, **kwargs())  # rows 2 + 2 + 1
    assert whole.abs().max() > 0
    # fp32 sums in another order: <= 1e-6 of the largest entry for the adjoint methods; 1e-5 for the
    # reward-gradient baselines, whose gradients pass through the reward model per micro-batch
    tol = (1e-6 if name in ("ode-am", "sde-am") else 1e-5) * float(whole.abs().max())
    assert float((whole - parts).abs().max()) <= tol
    assert out_parts.loss == pytest.approx(out_whole.loss, rel=1e-5, abs=1e-6)
    assert torch.allclose(out_parts.reward, out_whole.reward, atol=1e-6)
    assert torch.allclose(out_parts.control_norm_per_step, out_whole.control_norm_per_step, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out_parts.final_states, out_whole.final_states, atol=1e-6)


@pytest.mark.parametrize("method", ["ode-am", "sde-am"])
def test_trainer_micro_batches_equal_the_whole_batch(method, tmp_path):
    """Two updates of train_adjoint_matching.py at batch 4, whole vs micro-batches of 2: adapters within 1e-6."""
    from _run_helpers import run
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    # Adam's first steps are ~lr * sign(g): on near-zero entries fp32 rounding flips them. A large epsilon makes
    # the step lr * g / (|g| + eps), Lipschitz in g, so the adapters compare the gradients themselves.
    weights = []
    for extra in (["--adam_epsilon", "1.0"], ["--adam_epsilon", "1.0", "--micro_batch_size", "3"]):
        out = tmp_path / f"run{len(extra)}"
        assert run(EMBEDDED_DIGITS_BASE, out, "--method", method, "--train_batch_size", "4", *extra) == 0
        AcceleratorState._reset_state(reset_partial_state=True)
        weights.append(load_file(str(out / "pytorch_lora_weights.safetensors")))
    diff = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    assert diff <= 1e-6
    assert max(float(v.abs().max()) for k, v in weights[1].items() if "lora_B" in k) > 0


def test_micro_batch_size_is_checked():
    with pytest.raises(ValueError, match="--micro_batch_size"):
        TrainingConfig(train_batch_size=4, micro_batch_size=8)
    with pytest.raises(ValueError, match="--micro_batch_size"):
        TrainingConfig(micro_batch_size=0)
