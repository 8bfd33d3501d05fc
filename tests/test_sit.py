"""SiT-style transformer, pipeline, LoRA, checkpoint conversion and trainer adapter (tiny, offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _tiny_sit import tiny_latent_pipeline, tiny_pixel_pipeline, tiny_pixel_transformer
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_am.models import LoraSettings, load_model_adapter
from diffusers_am.models.sit import SiTAdapter
from diffusers_am.models.sit_transformer import SiTTransformer2DModel
from diffusers_am.objectives import ode_am_step
from diffusers_am.pipelines.sit import SiTPipeline


# -- transformer ---------------------------------------------------------------------------
def test_transformer_learn_sigma_output_and_velocity_slice():
    model = tiny_pixel_transformer()
    x = torch.randn(3, 1, 8, 8)
    out = model(x, timestep=torch.tensor(0.3), class_labels=torch.tensor([0, 9, 10])).sample
    assert out.shape == (3, 2, 8, 8)
    assert model.velocity_from_output(out).shape == (3, 1, 8, 8)
    # a 0-dim time equals the same time per sample
    out_b = model(x, timestep=torch.full((3,), 0.3), class_labels=torch.tensor([0, 9, 10])).sample
    torch.testing.assert_close(out, out_b)


def test_transformer_train_mode_does_not_drop_labels():
    model = tiny_pixel_transformer().train()
    x = torch.randn(64, 1, 8, 8)
    labels = torch.zeros(64, dtype=torch.long)
    a = model(x, 0.5, labels).sample
    b = model.eval()(x, 0.5, labels).sample
    torch.testing.assert_close(a, b)


def test_transformer_config_round_trip(tmp_path):
    model = tiny_pixel_transformer()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_classes"] == 10 and config["learn_sigma"] is True
    assert "num_embeds_ada_norm" not in config  # only this class's own keys are stored
    loaded = SiTTransformer2DModel.from_pretrained(tmp_path)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x, 0.1, torch.tensor([1, 2])).sample, model(x, 0.1, torch.tensor([1, 2])).sample)


@pytest.mark.parametrize(
    "shape, labels, match",
    [((2, 1, 16, 16), [0, 1], "built for"), ((2, 3, 8, 8), [0, 1], "built for"), ((2, 1, 8, 8), [0, 11], "class_labels")],
)
def test_transformer_rejects_bad_input(shape, labels, match):
    model = tiny_pixel_transformer()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape), 0.5, torch.tensor(labels))


def test_transformer_rejects_bad_config():
    with pytest.raises(ValueError, match="sample_size"):
        SiTTransformer2DModel(sample_size=7, patch_size=2, in_channels=1, num_layers=1,
                              num_attention_heads=2, attention_head_dim=8, num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        SiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=1, num_layers=1,
                              num_attention_heads=2, attention_head_dim=8, num_classes=0)


# -- pipeline ------------------------------------------------------------------------------
def test_pixel_pipeline_samples_and_round_trips(tmp_path):
    pipe = tiny_pixel_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = pipe([1, 2, 3], output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (3, 1, 8, 8) and out.min() >= 0 and out.max() <= 1
    pil = pipe(4, output_type="pil", generator=torch.Generator().manual_seed(0)).images
    assert pil[0].size == (8, 8) and pil[0].mode == "L"

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "SiTPipeline" and index["default_num_inference_steps"] == 4
    loaded = SiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None and loaded.config.default_num_inference_steps == 4
    again = loaded([1, 2, 3], output_type="pt", generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(again, out)


def test_pipeline_euler_loop_matches_manual_paper_time_integration():
    pipe = tiny_pixel_pipeline()
    pipe.set_progress_bar_config(disable=True)
    x0 = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([3, 7])
    x = x0.clone()
    times = torch.linspace(0, 1, 4)
    with torch.no_grad():
        for k in range(3):
            v = pipe.transformer(x, times[k], labels).sample[:, :1]
            x = x + (times[k + 1] - times[k]) * v
    got = pipe(labels, num_inference_steps=3, latents=x0, output_type="latent").images
    torch.testing.assert_close(got, x)


def test_pipeline_cfg_combines_conditional_and_null_velocities():
    pipe = tiny_pixel_pipeline()
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        v_c = pipe.predict_velocity(x, 0.4, labels)
        v_u = pipe.predict_velocity(x, 0.4, torch.full_like(labels, 10))
        v = pipe.predict_velocity(x, 0.4, labels, guidance_scale=3.0)
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)


def test_latent_pipeline_with_vae_and_scheduler_round_trips(tmp_path):
    pipe = tiny_latent_pipeline(scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    assert pipe.resolution == 8
    torch.testing.assert_close(pipe.time_grid(4), torch.linspace(0, 1, 5))
    out = pipe([0, 4], guidance_scale=2.0, output_type="np", generator=torch.Generator().manual_seed(1)).images
    assert out.shape == (2, 8, 8, 3) and np.isfinite(out).all()
    pipe.save_pretrained(tmp_path)
    loaded = SiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.vae).__name__ == "AutoencoderKL"
    again = loaded([0, 4], guidance_scale=2.0, output_type="np", generator=torch.Generator().manual_seed(1)).images
    np.testing.assert_allclose(again, out, atol=1e-6)


@pytest.mark.parametrize("labels", [[0, 10], [-1], [1.5], []])
def test_pipeline_rejects_labels_outside_classes(labels):
    pipe = tiny_pixel_pipeline()
    with pytest.raises(ValueError, match="class_labels"):
        pipe(labels, output_type="pt")


def test_pipeline_rejects_other_resolutions_and_bad_args():
    pipe = tiny_latent_pipeline()
    with pytest.raises(ValueError, match="built for 8x8"):
        pipe([0], height=16, output_type="pt")
    with pytest.raises(ValueError, match="built for 8x8"):
        pipe([0], width=4, output_type="pt")
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe([0], num_inference_steps=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe([0], output_type="jpg")
    with pytest.raises(ValueError, match="latents"):
        pipe([0], latents=torch.randn(1, 4, 8, 8))


# -- LoRA through the pipeline's loader mixin ------------------------------------------------
def _perturb_lora(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=g))


def test_lora_save_load_unload_round_trip(tmp_path):
    adapter = SiTAdapter(tiny_pixel_pipeline())
    params = adapter.add_lora(LoraSettings(rank=4))
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    _perturb_lora(adapter.transformer)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        tuned = adapter.transformer(x, 0.3, y).sample
    adapter.save_lora(str(tmp_path))
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()

    pipe = tiny_pixel_pipeline()
    with torch.no_grad():
        base = pipe.transformer(x, 0.3, y).sample
        pipe.load_lora_weights(str(tmp_path))
        loaded = pipe.transformer(x, 0.3, y).sample
        torch.testing.assert_close(loaded, tuned)
        assert not torch.allclose(loaded, base)
        pipe.unload_lora_weights()
        torch.testing.assert_close(pipe.transformer(x, 0.3, y).sample, base)


def test_add_lora_rejects_unknown_targets():
    adapter = SiTAdapter(tiny_pixel_pipeline())
    with pytest.raises(ValueError, match="to_qkv"):
        adapter.add_lora(LoraSettings(rank=2, target_modules=["to_q", "to_qkv"]))
    with pytest.raises(ValueError, match="rank"):
        adapter.add_lora(LoraSettings(rank=0))


# -- the trainer's adapter -------------------------------------------------------------------
def test_adapter_velocities_base_vs_finetuned_and_gradients():
    adapter = SiTAdapter(tiny_pixel_pipeline())
    labels = adapter.encode_conditions([3, "7"])
    assert labels.dtype == torch.long and labels.tolist() == [3, 7]
    flow = adapter.flow(labels)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(0.25)
    before = flow.base_velocity(x, t).detach()  # no adapter yet: the plain transformer
    params = adapter.add_lora(LoraSettings(rank=2))
    torch.testing.assert_close(flow.velocity(x, t), before)  # zero-initialised LoRA B
    _perturb_lora(adapter.transformer)
    torch.testing.assert_close(flow.base_velocity(x, t), before)
    assert all(p.requires_grad for p in params)  # re-enabled after the base pass
    tuned = flow.velocity(x, t)
    assert not torch.allclose(tuned, before)
    tuned.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for n, p in adapter.transformer.named_parameters() if "lora_" not in n)

    cfg = adapter.flow(labels, guidance_scale=2.5)
    with torch.no_grad():
        null = adapter.flow(torch.full_like(labels, 10)).velocity(x, t)
        torch.testing.assert_close(cfg.velocity(x, t), null + 2.5 * (tuned.detach() - null), rtol=1e-5, atol=1e-5)


def test_adapter_geometry_decode_and_errors():
    adapter = SiTAdapter(tiny_latent_pipeline())
    assert adapter.conditioning == "class" and adapter.default_resolution == 8
    assert adapter.default_num_inference_steps == 4
    torch.testing.assert_close(adapter.time_grid(5, 8), torch.linspace(0, 1, 6))
    noise = adapter.initial_noise(3, 8, torch.Generator().manual_seed(0))
    assert noise.shape == (3, 4, 4, 4) and noise.dtype == torch.float32
    x = (3 * torch.randn(2, 4, 4, 4)).requires_grad_(True)
    images = adapter.decode(x)
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    images.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="--resolution"):
        adapter.time_grid(5, 256)
    with pytest.raises(ValueError, match="--resolution"):
        adapter.initial_noise(1, 16, None)
    with pytest.raises(ValueError, match="class_labels"):
        adapter.encode_conditions([5])
    with pytest.raises(ValueError, match="class_labels"):
        adapter.encode_conditions(["a cat"])


def test_pixel_decode_is_straight_through():
    adapter = SiTAdapter(tiny_pixel_pipeline())
    x = torch.tensor([-3.0, -0.5, 0.5, 3.0]).reshape(1, 1, 2, 2).requires_grad_(True)
    images = adapter.decode(x)
    torch.testing.assert_close(images.detach().flatten(), torch.tensor([0.0, 0.25, 0.75, 1.0]))
    images.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5))


def test_ode_am_step_trains_a_saved_tiny_sit_through_load_model_adapter(tmp_path):
    tiny_pixel_pipeline().save_pretrained(tmp_path)
    adapter = load_model_adapter(str(tmp_path))
    assert isinstance(adapter, SiTAdapter)
    params = adapter.add_lora(LoraSettings(rank=2))
    optimizer = torch.optim.SGD(params, lr=1.0)
    flow = adapter.flow(adapter.encode_conditions([0, 1, 2]))
    noise = adapter.initial_noise(3, adapter.default_resolution, torch.Generator().manual_seed(0))
    times = adapter.time_grid(4, adapter.default_resolution)

    def reward_fn(x):
        return adapter.decode(x).mean(dim=(1, 2, 3))

    before = [p.detach().clone() for p in params]
    out = ode_am_step(flow, noise, times, reward_fn, truncate_steps=2, reward_scale=10.0)
    optimizer.step()
    assert np.isfinite(out.loss) and out.loss > 0
    assert out.reward.shape == (3,) and out.control_norm_per_step.shape == (2,)
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    x, t = noise, times[2]
    with torch.no_grad():
        assert not torch.allclose(flow.velocity(x, t), flow.base_velocity(x, t))
