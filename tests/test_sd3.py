"""SD3 adapter and controlled pipeline on a tiny random StableDiffusion3Pipeline written to disk (offline)."""

import pytest
from _flowmatch_checks import (
    PROMPTS,
    SEQ,
    adapter_trajectory,
    adapter_with_random_lora,
    check_base_matches_stock,
    check_lora_round_trip,
    check_ode_am_step,
    check_time_grid,
    check_window_and_recording,
    gen,
    stock_call_kwargs,
)
from _tiny_pipelines import TINY_RESOLUTION as RES
from _tiny_pipelines import save_tiny_sd3

from diffusers_am.models import LoraSettings, load_model_adapter

GUIDANCE = 3.0


def call_kwargs(**over):
    return stock_call_kwargs(GUIDANCE, **over)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def trained(sd3_dir, tmp_path_factory):
    return adapter_with_random_lora(sd3_dir, tmp_path_factory.mktemp("sd3-lora"))


def test_sd3_adapter_matches_stock_pipeline(trained, sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    from diffusers_am.models.sd3 import SD3Adapter
    from diffusers_am.pipelines import AdjointMatchingStableDiffusion3Pipeline

    adapter, params, lora_dir = trained
    assert isinstance(adapter, SD3Adapter) and adapter.resolve_guidance(None) == 7.0
    stock = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    check_time_grid(adapter, stock, call_kwargs())
    check_base_matches_stock(adapter, stock, call_kwargs(), GUIDANCE)  # batched CFG
    check_base_matches_stock(adapter, stock, call_kwargs(guidance_scale=1.0), 1.0)  # no CFG
    with_cfg = adapter_trajectory(adapter, "base_velocity", guidance_scale=GUIDANCE)[1]
    assert (with_cfg - adapter_trajectory(adapter, "base_velocity", guidance_scale=1.0)[1]).abs().max() > 1e-4
    controlled = check_lora_round_trip(
        adapter, sd3_dir, lora_dir, StableDiffusion3Pipeline, AdjointMatchingStableDiffusion3Pipeline, call_kwargs()
    )
    check_window_and_recording(adapter, controlled, call_kwargs())
    x = adapter.initial_noise(2, RES, gen())
    assert x.shape == (2, 4, RES // 8, RES // 8)


def test_sd3_ode_am_step(trained):
    adapter, params, _ = trained
    check_ode_am_step(adapter, params, guidance_scale=GUIDANCE)


def test_sd3_bad_inputs(trained, sd3_dir):
    adapter = trained[0]
    with pytest.raises(ValueError, match="multiple of 16"):
        adapter.initial_noise(1, 40, None)
    with pytest.raises(ValueError, match="guidance_scale"):
        adapter.flow(adapter.encode_conditions(PROMPTS[:1]), guidance_scale=-1.0)
    fresh = load_model_adapter(sd3_dir, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match="'ff.nowhere'"):
        fresh.add_lora(LoraSettings(rank=2, target_modules=["attn.to_q", "ff.nowhere"]))
