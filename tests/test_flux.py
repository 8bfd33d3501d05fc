"""FLUX.1 adapter and controlled pipeline on a tiny random FluxPipeline written to disk (offline)."""

import pytest
import torch
from _flowmatch_checks import (
    N,
    SEQ,
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
from _tiny_pipelines import save_tiny_flux

from diffusers_am.models import LoraSettings, load_model_adapter

GUIDANCE = 2.5


def call_kwargs(**over):
    return stock_call_kwargs(GUIDANCE, **over)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def trained(flux_dir, tmp_path_factory):
    return adapter_with_random_lora(flux_dir, tmp_path_factory.mktemp("flux-lora"))


def test_flux_adapter_matches_stock_pipeline(trained, flux_dir):
    from diffusers import FluxPipeline

    from diffusers_am.models.flux import FluxAdapter
    from diffusers_am.pipelines import AdjointMatchingFluxPipeline

    adapter, params, lora_dir = trained
    assert isinstance(adapter, FluxAdapter) and adapter.has_guidance_embeds and adapter.resolve_guidance(None) == 3.5
    stock = FluxPipeline.from_pretrained(flux_dir)
    check_time_grid(adapter, stock, call_kwargs())
    check_base_matches_stock(adapter, stock, call_kwargs(), GUIDANCE)
    # the guidance embedding is used: another scale gives other images
    other = stock(generator=gen(), **call_kwargs(guidance_scale=6.0)).images
    assert (other - stock(generator=gen(), **call_kwargs()).images).abs().max() > 1e-4
    controlled = check_lora_round_trip(adapter, flux_dir, lora_dir, FluxPipeline, AdjointMatchingFluxPipeline, call_kwargs())
    check_window_and_recording(adapter, controlled, call_kwargs())
    x = adapter.initial_noise(2, RES, gen())
    assert x.shape == (2, 1, RES // 8, RES // 8)
    assert adapter.decode(x).shape == (2, 3, RES, RES)


def test_flux_ode_am_step(trained):
    adapter, params, _ = trained
    check_ode_am_step(adapter, params, guidance_scale=GUIDANCE)


def test_flux_bad_inputs(trained, flux_dir):
    adapter = trained[0]
    with pytest.raises(ValueError, match="multiple of 16"):
        adapter.time_grid(N, 24)
    fresh = load_model_adapter(flux_dir, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match="'attn.to_nowhere'"):
        fresh.add_lora(LoraSettings(rank=2, target_modules=["attn.to_nowhere"]))
    with pytest.raises(ValueError, match="FluxAdapter.encode_conditions"):
        adapter.flow({"prompt": 1}).velocity(adapter.initial_noise(1, RES, None), torch.tensor(0.5))
