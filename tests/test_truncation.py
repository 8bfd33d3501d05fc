"""Adaptive truncation: the share rule, its closed form on the Gaussian toy, and the run state."""

import json
import math

import pytest
import torch

from diffusers_am.probe import probe_control_profile
from diffusers_am.toy.gaussian import GaussianToy, ToyControlledFlow
from diffusers_am.toy.gaussian_fit import uniform_grid
from diffusers_am.truncation import AdaptiveTruncation, window_for_share


class ZeroControl(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


def _toy_energy(toy, n, order=2.0, reward_scale=1.0):
    prof = probe_control_profile(
        ToyControlledFlow(toy, ZeroControl()), torch.randn(2, 1, dtype=torch.float64), uniform_grid(n).double(),
        toy.reward, order=order, reward_scale=reward_scale,
    )
    return prof.energy_per_step()


def test_window_for_share_on_simple_profiles():
    assert window_for_share(torch.tensor([0.0, 0.0, 0.0, 1.0]), 0.99) == 1
    uniform = torch.ones(10)
    assert [window_for_share(uniform, q) for q in (0.1, 0.5, 0.8, 0.81, 1.0)] == [1, 5, 8, 9, 10]
    early = torch.tensor([5.0, 1.0, 1.0, 1.0])  # most energy in the first step
    assert [window_for_share(early, q) for q in (0.5, 0.3, 0.25)] == [4, 3, 2]
    assert window_for_share(torch.tensor([0.0, 1.0, 1.0]), 1.0) == 2  # from the first step with energy
    assert window_for_share(uniform * 1e6, 0.5) == window_for_share(uniform, 0.5)  # scale-free
    # bounds clip, an all-zero profile takes the cheapest window
    assert window_for_share(uniform, 0.1, min_steps=3) == 3 and window_for_share(uniform, 0.9, max_steps=6) == 6
    assert window_for_share(torch.zeros(5), 0.8, min_steps=2) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"share": 0.0}, "share"), ({"share": 1.5}, "share"), ({"share": "x"}, "share"),
        ({"min_steps": 0}, "min_steps"), ({"max_steps": 11}, "max_steps"),
        ({"min_steps": 5, "max_steps": 4}, "min_steps"),
    ],
)
def test_window_for_share_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        window_for_share(torch.ones(10), **kwargs)


@pytest.mark.parametrize("energy", [torch.tensor([1.0, -0.1]), torch.tensor([1.0, float("nan")]), torch.ones(2, 2)])
def test_window_for_share_rejects_bad_energy(energy):
    with pytest.raises(ValueError, match="energy"):
        window_for_share(energy)


@pytest.mark.parametrize("std", [0.5, 0.8])
@pytest.mark.parametrize("share", [0.3, 0.5, 0.8, 0.9])
def test_toy_window_matches_the_closed_form(std, share):
    # p = 2: e(t) = lambda^2 c^2 s^2 / D(t), D = (1 - t)^2 + t^2 s^2, with primitive arctan(((1 + s^2) t - 1) / s) / s;
    # the window [t_s, 1] holds the share q where F(t_s) = F(1) - q (F(1) - F(0)).
    toy = GaussianToy(mean=1.0, std=std, reward_slope=0.7)
    n = 1000
    F = lambda t: math.atan(((1 + std**2) * t - 1) / std)  # noqa: E731
    t_s = (1 + std * math.tan(F(1.0) - share * (F(1.0) - F(0.0)))) / (1 + std**2)
    k = window_for_share(_toy_energy(toy, n, reward_scale=3.0), share)
    assert abs(k - n * (1 - t_s)) <= 2


def test_toy_window_grows_with_the_order_and_not_with_lambda():
    toy = GaussianToy(mean=1.0, std=0.5)
    assert abs(window_for_share(_toy_energy(toy, 200)) - 40) <= 1  # the default share 0.3: the last 20% of N
    ks = [window_for_share(_toy_energy(toy, 200, order=p), 0.8) for p in (2, 4, 6)]
    assert ks[0] < ks[1] < ks[2]  # higher p: flatter energy |a~|^(p/(p-1)) dt, a wider window for the same share
    assert window_for_share(_toy_energy(toy, 200, order=4, reward_scale=100.0), 0.8) == ks[1]


def test_adaptive_truncation_refresh_schedule_and_smoothing():
    state = AdaptiveTruncation(4, share=0.5, refresh_every=3, smoothing=0.5)
    assert state.due(0) and state.steps is None
    assert state.update(torch.tensor([0.0, 0.0, 1.0, 1.0]), 0) == 1  # 1/2 of the energy in the last step
    assert not state.due(1) and not state.due(2) and state.due(3)
    # the profile is smoothed: the new probe puts everything in the first step, the mean profile is [.5, 0, .25, .25]
    assert state.update(torch.tensor([4.0, 0.0, 0.0, 0.0]), 3) == 2
    torch.testing.assert_close(state.profile, torch.tensor([0.5, 0.0, 0.25, 0.25], dtype=torch.float64))
    assert state.history == [(0, 1), (3, 2)]
    # a probe with no signal keeps the last profile
    assert state.update(torch.zeros(4), 6) == 2 and state.last_probe == 6
    fresh = AdaptiveTruncation(4, share=0.5, smoothing=0.0)
    fresh.update(torch.tensor([0.0, 0.0, 1.0, 1.0]), 0)
    assert fresh.update(torch.tensor([4.0, 0.0, 0.0, 0.0]), 10) == 4
    assert fresh.update(torch.tensor([0.0, 0.0, 0.0, 1.0]), 20) == 1


def test_adaptive_truncation_state_round_trips_through_json():
    state = AdaptiveTruncation(5, share=0.8, min_steps=2, max_steps=4, refresh_every=2, smoothing=0.25)
    state.update(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), 0)
    state.update(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), 2)
    saved = json.loads(json.dumps(state.state_dict()))
    restored = AdaptiveTruncation(5, share=0.8, min_steps=2, max_steps=4, refresh_every=2, smoothing=0.25)
    restored.load_state_dict(saved)
    assert restored.steps == state.steps and restored.last_probe == 2 and restored.history == state.history
    torch.testing.assert_close(restored.profile, state.profile)
    assert restored.due(4) and not restored.due(3)
    with pytest.raises(ValueError, match="num_inference_steps"):
        AdaptiveTruncation(6).load_state_dict(saved)
    blank = AdaptiveTruncation(5)
    blank.load_state_dict(AdaptiveTruncation(5).state_dict())
    assert blank.steps is None and blank.due(0)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"refresh_every": 0}, "refresh_every"), ({"smoothing": 1.0}, "smoothing"), ({"share": -1}, "share"),
     ({"max_steps": 9}, "max_steps")],
)
def test_adaptive_truncation_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveTruncation(8, **kwargs)
    with pytest.raises(ValueError, match="energy_per_step"):
        AdaptiveTruncation(8).update(torch.ones(7), 0)
