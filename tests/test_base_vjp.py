"""The adjoint's base VJP runs the base model, not the fine-tuned one, for every family.

For each family (FLUX.2-klein, FLUX.1, SD3 and SiT) a random non-zero LoRA is added, then
``flow.base_vjp(x, t, c)`` must equal plain autograd of the velocity with the adapter switched off
through the transformer's own (diffusers / PEFT) ``disable_adapters``, and must differ from the
same autograd with the adapter on. A base VJP taken with the LoRA on would make the adjoint's
target come from the model being trained.
"""

from __future__ import annotations

import pytest
import torch
from _tiny_pipelines import TINY_RESOLUTION as RES
from _tiny_pipelines import save_tiny_flux, save_tiny_flux2_klein, save_tiny_sd3
from _tiny_sit import tiny_pixel_pipeline

from diffusers_am.models import LoraSettings, load_model_adapter
from diffusers_am.models.sit import SiTAdapter

TOL = 1e-5  # fp32 CPU, the same operations: rounding only
PROMPTS = ["a red cat", "a dog"]


def _flowmatch(save, seq, guidance):
    def build(tmp_path):
        adapter = load_model_adapter(save(tmp_path / "model"), max_sequence_length=seq)
        return adapter, PROMPTS, guidance, RES

    return build


def _sit(tmp_path):
    return SiTAdapter(tiny_pixel_pipeline()), [1, 3], 2.0, 8


FAMILIES = {
    "flux2-klein": _flowmatch(save_tiny_flux2_klein, 32, None),
    "flux": _flowmatch(save_tiny_flux, 16, 2.5),
    "sd3": _flowmatch(save_tiny_sd3, 16, 3.0),  # batched CFG: both halves through the base
    "sit": _sit,
}


def _autograd_vjp(velocity, x, t, cotangent):
    x = x.detach().requires_grad_(True)
    v = velocity(x, t)
    (g,) = torch.autograd.grad(v, x, grad_outputs=cotangent)
    return v.detach(), g


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_base_vjp_is_autograd_through_the_base_with_the_adapter_disabled(family, tmp_path):
    adapter, conditions, guidance, resolution = FAMILIES[family](tmp_path)
    adapter.add_lora(LoraSettings(rank=4, init_lora_weights=False))
    flow = adapter.flow(adapter.encode_conditions(conditions), guidance_scale=guidance)
    x = adapter.initial_noise(len(conditions), resolution, torch.Generator().manual_seed(3))
    t = torch.tensor(0.4)
    cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))

    v, g = flow.base_vjp(x, t, cotangent)

    transformer = adapter.transformer
    transformer.disable_adapters()  # the stock switch, not ours
    try:
        v_base, g_base = _autograd_vjp(flow.velocity, x, t, cotangent)
    finally:
        transformer.enable_adapters()
    v_tuned, g_tuned = _autograd_vjp(flow.velocity, x, t, cotangent)

    torch.testing.assert_close(v, v_base, atol=TOL, rtol=TOL)
    torch.testing.assert_close(g, g_base, atol=TOL, rtol=TOL)
    # the LoRA matters, so a VJP taken with it on could not pass the check above
    assert (g_tuned - g_base).abs().max() > 1e3 * TOL * g_base.abs().max()
    assert (v_tuned - v_base).abs().max() > 1e3 * TOL * v_base.abs().max()
    assert g.dtype == torch.float32 and v.dtype == torch.float32
