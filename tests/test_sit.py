"""SiT-style transformer, pipeline, LoRA, checkpoint conversion and trainer adapter (tiny, offline)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from _tiny_sit import tiny_latent_pipeline, tiny_pixel_pipeline, tiny_pixel_transformer, tiny_vae
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_am.models import LoraSettings, load_model_adapter
from diffusers_am.models.sit import SiTAdapter
from diffusers_am.models.sit_convert import (
    convert_sit_checkpoint,
    convert_sit_state_dict,
    sit_config_from_state_dict,
    sit_transformer_from_state_dict,
)
from diffusers_am.objectives import ode_am_step
from diffusers_am.pipelines.sit import SiTPipeline
from diffusers_am.pipelines.sit_transformer import SiTTransformer2DModel

convert_script = importlib.import_module("convert_sit_checkpoint")


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
    [
        ((2, 1, 16, 16), [0, 1], "built for"),
        ((2, 3, 8, 8), [0, 1], "built for"),
        ((2, 1, 8, 8), [0, 11], "class_labels"),
    ],
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
    labels = adapter.encode_conditions([np.int64(3), "7"])
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


# -- conversion of the official SiT format ---------------------------------------------------
def official_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """SiT's fixed 2-D sin-cos table [1, grid^2, dim]: first half encodes the column, second the row."""

    def one_axis(pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        angles = pos[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    axis = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    return torch.cat([one_axis(cols.reshape(-1)), one_axis(rows.reshape(-1))], dim=1)[None].float()


def official_sit_state_dict(
    depth=2, hidden=32, in_channels=4, patch=2, grid=2, num_classes=5, learn_sigma=True, seed=0
):
    """Random weights under the official SiT key names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return 0.3 * torch.randn(*shape, generator=g)

    out_channels = 2 * in_channels if learn_sigma else in_channels
    sd = {
        "x_embedder.proj.weight": w(hidden, in_channels, patch, patch), "x_embedder.proj.bias": w(hidden),
        "pos_embed": official_pos_embed(hidden, grid),
        "t_embedder.mlp.0.weight": w(hidden, 256), "t_embedder.mlp.0.bias": w(hidden),
        "t_embedder.mlp.2.weight": w(hidden, hidden), "t_embedder.mlp.2.bias": w(hidden),
        "y_embedder.embedding_table.weight": w(num_classes + 1, hidden),
        "final_layer.linear.weight": w(patch * patch * out_channels, hidden),
        "final_layer.linear.bias": w(patch * patch * out_channels),
        "final_layer.adaLN_modulation.1.weight": w(2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": w(2 * hidden),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "attn.qkv.weight": w(3 * hidden, hidden), b + "attn.qkv.bias": w(3 * hidden),
            b + "attn.proj.weight": w(hidden, hidden), b + "attn.proj.bias": w(hidden),
            b + "mlp.fc1.weight": w(4 * hidden, hidden), b + "mlp.fc1.bias": w(4 * hidden),
            b + "mlp.fc2.weight": w(hidden, 4 * hidden), b + "mlp.fc2.bias": w(hidden),
            b + "adaLN_modulation.1.weight": w(6 * hidden, hidden), b + "adaLN_modulation.1.bias": w(6 * hidden),
        })
    return sd


def reference_sit_velocity(sd, x, t, y, heads):
    """SiT's forward written from its equations (adaLN-Zero DiT blocks), velocity channels only."""
    F = torch.nn.functional
    lin = lambda h, name: F.linear(h, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    ln = lambda h: F.layer_norm(h, h.shape[-1:], eps=1e-6)  # noqa: E731
    modulate = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]  # noqa: E731
    patch = sd["x_embedder.proj.weight"].shape[-1]
    b, c_in = x.shape[:2]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    n_tok, dim = h.shape[1:]
    freqs = torch.exp(-np.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    angles = t[:, None] * freqs[None]
    t_emb = lin(F.silu(lin(torch.cat([angles.cos(), angles.sin()], 1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = lin(F.silu(c), p + "adaLN_modulation.1").chunk(6, dim=1)
        qkv = lin(modulate(ln(h), s_msa, sc_msa), p + "attn.qkv").reshape(b, n_tok, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) * (dim // heads) ** -0.5, dim=-1) @ v
        h = h + g_msa[:, None] * lin(attn.transpose(1, 2).reshape(b, n_tok, dim), p + "attn.proj")
        mlp = lin(F.gelu(lin(modulate(ln(h), s_mlp, sc_mlp), p + "mlp.fc1"), approximate="tanh"), p + "mlp.fc2")
        h = h + g_mlp[:, None] * mlp
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(modulate(ln(h), shift, scale), "final_layer.linear")
    grid = int(n_tok**0.5)
    c_out = h.shape[-1] // patch**2
    img = torch.einsum("nhwpqc->nchpwq", h.reshape(b, grid, grid, patch, patch, c_out))
    return img.reshape(b, c_out, grid * patch, grid * patch)[:, :c_in]


def test_convert_official_sit_matches_reference_forward():
    sd = official_sit_state_dict()
    config = sit_config_from_state_dict(sd, num_attention_heads=4)
    assert config == {"sample_size": 4, "patch_size": 2, "in_channels": 4, "num_layers": 2, "num_attention_heads": 4,
                      "attention_head_dim": 8, "num_classes": 5, "learn_sigma": True, "mlp_ratio": 4.0}
    converted = convert_sit_state_dict(sd, 2)
    assert set(converted) == set(SiTTransformer2DModel(**config).state_dict())  # every weight, nothing else
    assert len(converted) == 6 + 2 * 19  # 6 globals; per block: 4 time MLP + 1 label table copies, q/k/v/out, ff, adaLN
    model = sit_transformer_from_state_dict(sd, num_attention_heads=4)
    torch.testing.assert_close(model.pos_embed.pos_embed, sd["pos_embed"])
    x, t, y = torch.randn(3, 4, 4, 4), torch.tensor([0.0, 0.37, 1.0]), torch.tensor([0, 4, 5])
    with torch.no_grad():
        got = model.velocity_from_output(model(x, t, y).sample)
        want = reference_sit_velocity(sd, x, t, y, heads=4)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_convert_rejects_missing_and_unexpected_keys():
    sd = official_sit_state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(8)
    expected = r"missing keys: blocks\.1\.mlp\.fc2\.bias.*unexpected keys: blocks\.0\.attn\.q_norm\.weight"
    with pytest.raises(ValueError, match=expected):
        sit_config_from_state_dict(sd, num_attention_heads=4)
    with pytest.raises(ValueError, match="no `blocks"):
        sit_config_from_state_dict({"model": torch.zeros(1)})


def test_convert_rejects_unknown_heads_and_altered_pos_embed():
    sd = official_sit_state_dict()
    with pytest.raises(ValueError, match="num_attention_heads"):
        sit_config_from_state_dict(sd)  # hidden 32 is no official SiT size
    sd["pos_embed"] = sd["pos_embed"] + 0.5
    with pytest.raises(ValueError, match="pos_embed"):
        sit_transformer_from_state_dict(sd, num_attention_heads=4)


def test_convert_script_writes_a_latent_pipeline_with_vae(tmp_path):
    sd = official_sit_state_dict(num_classes=5)
    torch.save({"ema": sd, "opt": {}}, tmp_path / "sit.pt")  # train.py layout: EMA weights are used
    tiny_vae().save_pretrained(tmp_path / "vae")
    out_dir = tmp_path / "pipe"
    rc = convert_script.main(["--checkpoint_path", str(tmp_path / "sit.pt"), "--vae", str(tmp_path / "vae"),
                              "--output_dir", str(out_dir), "--num_attention_heads", "4"])
    assert rc == 0
    adapter = load_model_adapter(str(out_dir))
    assert adapter.default_num_inference_steps == 50 and adapter.default_resolution == 8
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor(0.6), torch.tensor([1, 3])
    with torch.no_grad():
        got = adapter.flow(y).velocity(x, t)
        torch.testing.assert_close(got, reference_sit_velocity(sd, x, t.expand(2), y, heads=4), rtol=1e-4, atol=1e-5)
        vae = adapter.pipeline.vae
        want = (vae.decode(x / 0.18215).sample * 0.5 + 0.5).clamp(0, 1)
        torch.testing.assert_close(adapter.decode(x), want)
    with pytest.raises(ValueError, match="vae"):
        convert_sit_checkpoint(tmp_path / "sit.pt", vae=str(tmp_path / "no-vae"), num_attention_heads=4)


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, text the one-line error must contain)."""
    good = tmp_path / "good.pt"
    torch.save(official_sit_state_dict(), good)
    files = {"missing": (tmp_path / "nope.pt", "is not a file"), "folder": (tmp_path, "is not a file")}
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    files["text"] = (tmp_path / "notes.pt", "not a readable SiT checkpoint")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:4000])
    files["truncated"] = (tmp_path / "cut.pt", "not a readable SiT checkpoint")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    files["bad safetensors"] = (tmp_path / "cut.safetensors", "not a readable SiT checkpoint")
    torch.save({"model": torch.zeros(2), "blocks.0.x": torch.zeros(1)}, tmp_path / "other.pt")
    files["wrong keys"] = (tmp_path / "other.pt", "missing keys")
    torch.save({"args": Path("x")}, tmp_path / "pickled.pt")
    files["pickled object"] = (tmp_path / "pickled.pt", "not a readable SiT checkpoint")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    files["not a dict"] = (tmp_path / "list.pt", "does not hold a SiT state dict")
    return files


def test_convert_script_bad_checkpoint_prints_one_line_and_exits_2(tmp_path, capsys):
    for name, (file, text) in _bad_checkpoints(tmp_path).items():
        out_dir = tmp_path / f"out-{name.replace(' ', '-')}"
        rc = convert_script.main(["--checkpoint_path", str(file), "--vae", "none", "--output_dir", str(out_dir),
                                  "--num_attention_heads", "4"])
        err = capsys.readouterr().err
        assert rc == 2, name
        assert err.startswith("error: `checkpoint_path`"), (name, err)
        assert err.count("\n") == 1 and text in err and "Traceback" not in err, (name, err)
        assert not out_dir.exists(), name


def test_convert_script_bad_guidance_channels_exit_2(tmp_path, capsys):
    torch.save(official_sit_state_dict(), tmp_path / "sit.pt")
    for value in ("7", "some"):
        rc = convert_script.main(["--checkpoint_path", str(tmp_path / "sit.pt"), "--vae", "none", "--output_dir",
                                  str(tmp_path / "out"), "--num_attention_heads", "4", "--guidance_channels", value])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: `guidance_channels`") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# -- sampling as the official SiT code does it -------------------------------------------------
def official_forward_with_cfg(forward, x, t, y, cfg_scale):
    """SiT's ``forward_with_cfg`` (models.py), from its code: the batch is [cond half; null half]
    with the same states; CFG on the first 3 output channels, the rest passes through per half."""
    half = x[: len(x) // 2]
    model_out = forward(torch.cat([half, half]), t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)


def official_euler_ode_sample(drift, z, num_steps):
    """SiT's ``Sampler.sample_ode(sampling_method="euler", num_steps=M)`` on the Linear velocity path:
    torchdiffeq's fixed-grid Euler on ``linspace(0, 1, M)``, i.e. M - 1 steps; the last state."""
    t = torch.linspace(0.0, 1.0, num_steps)
    for k in range(num_steps - 1):
        z = z + (t[k + 1] - t[k]) * drift(z, torch.full((z.shape[0],), float(t[k])))
    return z


def test_converted_pipeline_guides_the_official_channels(tmp_path):
    sd = official_sit_state_dict(num_classes=5)
    torch.save(sd, tmp_path / "sit.pt")
    pipe = convert_sit_checkpoint(tmp_path / "sit.pt", tmp_path / "pipe", num_attention_heads=4)
    assert pipe.config.guidance_channels == 3
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["guidance_channels"] == 3
    forward = lambda x, t, y: reference_sit_velocity(sd, x, t, y, heads=4)  # noqa: E731
    x, y = torch.randn(3, 4, 4, 4), torch.tensor([0, 2, 4])
    null = torch.full_like(y, 5)
    with torch.no_grad():
        want = official_forward_with_cfg(forward, torch.cat([x, x]), torch.full((6,), 0.3), torch.cat([y, null]), 4.0)
        loaded = SiTPipeline.from_pretrained(tmp_path / "pipe")
        got = loaded.predict_velocity(x, 0.3, y, guidance_scale=4.0)
        torch.testing.assert_close(got, want[:3], rtol=1e-4, atol=1e-5)
        # the option: every channel guided (standard CFG) differs on channel 3 only
        every = SiTPipeline.from_pretrained(tmp_path / "pipe", guidance_channels=None)
        assert every.config.guidance_channels is None
        v_all = every.predict_velocity(x, 0.3, y, guidance_scale=4.0)
        torch.testing.assert_close(v_all[:, :3], got[:, :3])
        assert (v_all[:, 3] - got[:, 3]).abs().max() > 0.1
        # a few Euler steps: pipeline num_inference_steps = official num_steps - 1
        z = torch.randn(3, 4, 4, 4)
        drift = lambda zz, t: official_forward_with_cfg(forward, zz, t, torch.cat([y, null]), 4.0)  # noqa: E731
        want_x = official_euler_ode_sample(drift, torch.cat([z, z]), num_steps=5).chunk(2)[0]
        loaded.set_progress_bar_config(disable=True)
        got_x = loaded(y, num_inference_steps=4, guidance_scale=4.0, latents=z, output_type="latent").images
        torch.testing.assert_close(got_x, want_x, rtol=1e-4, atol=1e-4)
    assert convert_sit_checkpoint(tmp_path / "sit.pt", num_attention_heads=4, guidance_channels="all").config[
        "guidance_channels"
    ] is None


def test_guidance_channels_validated_and_embedded_base_guides_every_channel():
    with pytest.raises(ValueError, match="guidance_channels"):
        tiny_latent_pipeline(guidance_channels=5)
    with pytest.raises(ValueError, match="guidance_channels"):
        tiny_pixel_pipeline(guidance_channels=0)
    from diffusers_am.models import EMBEDDED_DIGITS_BASE

    pipe = SiTPipeline.from_pretrained(EMBEDDED_DIGITS_BASE)  # saved before the field existed
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.guidance_channels is None
    x0, labels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([2, 7])
    x, times = x0.clone(), torch.linspace(0, 1, 4)
    with torch.no_grad():
        for k in range(3):
            v_c = pipe.transformer(x, times[k], labels).sample
            v_u = pipe.transformer(x, times[k], torch.full_like(labels, 10)).sample
            x = x + (times[k + 1] - times[k]) * (v_u + 2.0 * (v_c - v_u))
        got = pipe(labels, num_inference_steps=3, guidance_scale=2.0, latents=x0, output_type="latent").images
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_pipeline_control_window_and_scale(tmp_path):
    adapter = SiTAdapter(tiny_pixel_pipeline())
    adapter.add_lora(LoraSettings(rank=2))
    _perturb_lora(adapter.transformer)
    pipe = adapter.pipeline
    x0, labels = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])

    def run(**kw):
        return pipe(labels, num_inference_steps=4, latents=x0, output_type="latent", **kw).images

    tuned = run()
    with adapter.adapters_disabled():
        base = run()
    torch.testing.assert_close(run(control_scale=0.0), base)
    torch.testing.assert_close(run(control_start=1.0), base)  # t_N = 1 is never a step start
    assert not torch.allclose(run(control_start=0.5), tuned) and not torch.allclose(run(control_start=0.5), base)
    # manual: base velocity for t < 0.5, base + 2 (lora - base) after
    x, times = x0.clone(), torch.linspace(0, 1, 5)
    with torch.no_grad():
        for k in range(4):
            with adapter.adapters_disabled():
                b = pipe.predict_velocity(x, times[k], labels)
            v = b if times[k] < 0.5 else b + 2.0 * (pipe.predict_velocity(x, times[k], labels) - b)
            x = x + (times[k + 1] - times[k]) * v
    torch.testing.assert_close(run(control_scale=2.0, control_start=0.5), x)
    with pytest.raises(ValueError, match="need a LoRA"):
        tiny_pixel_pipeline()([1], control_scale=0.5)
    with pytest.raises(ValueError, match="control_start"):
        run(control_start=1.5)
    with pytest.raises(ValueError, match="scheduler"):
        SiTPipeline(tiny_pixel_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    grads = []
    for checkpointing in (False, True):
        adapter = SiTAdapter(tiny_pixel_pipeline())
        params = adapter.add_lora(LoraSettings(rank=2))
        _perturb_lora(adapter.transformer)
        if checkpointing:
            adapter.transformer.enable_gradient_checkpointing()
        adapter.transformer.train()
        flow = adapter.flow(adapter.encode_conditions([1, 8]), guidance_scale=1.5)
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
        flow.velocity(x, torch.tensor(0.7)).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_pipeline_control_window_matches_control_start_and_callbacks():
    import warnings

    from diffusers_am import deprecation
    from diffusers_am.pipelines import SiTPipeline as Exported

    assert Exported is SiTPipeline
    deprecation._WARNED.clear()  # warned once per process: start fresh
    adapter = SiTAdapter(tiny_pixel_pipeline())
    adapter.add_lora(LoraSettings(rank=2))
    _perturb_lora(adapter.transformer)
    pipe = adapter.pipeline
    x0, labels = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])

    def run(**kw):
        return pipe(labels, num_inference_steps=4, latents=x0, output_type="latent", **kw).images

    tuned = run()
    with adapter.adapters_disabled():
        base = run()
    for k in (1, 2, 3):  # uniform grid t_j = j / 4: the last K steps start at t = (4 - K) / 4
        with pytest.warns(FutureWarning, match="control_window") if k == 1 else warnings.catch_warnings():
            old = run(control_scale=2.0, control_start=(4 - k) / 4)
        new = run(control_scale=2.0, control_window=k)
        torch.testing.assert_close(new, old, rtol=0, atol=0)
        assert not torch.allclose(new, base)
    torch.testing.assert_close(run(control_window=4), tuned, rtol=0, atol=0)
    torch.testing.assert_close(run(control_window="all"), tuned, rtol=0, atol=0)
    with pytest.raises(ValueError, match="larger than num_inference_steps"):
        run(control_window=5)
    with pytest.raises(ValueError, match="not both"):
        run(control_window=2, control_start=0.5)
    with pytest.raises(ValueError, match="need a LoRA"):
        tiny_pixel_pipeline()([1], control_window=1)

    seen = []

    def record(p, step, t, kwargs):
        assert p is pipe and set(kwargs) == {"latents"}
        seen.append((step, float(t), kwargs["latents"].clone()))
        return {}

    torch.testing.assert_close(run(callback_on_step_end=record), tuned, rtol=0, atol=0)
    assert [s for s, _, _ in seen] == [0, 1, 2, 3] and [t for _, t, _ in seen] == [0.0, 0.25, 0.5, 0.75]
    torch.testing.assert_close(seen[-1][2], tuned)
    # a returned "latents" replaces the state: zeroing it after the last step gives zeros
    out = run(callback_on_step_end=lambda p, s, t, kw: {"latents": torch.zeros_like(kw["latents"])} if s == 3 else {})
    assert torch.count_nonzero(out) == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(callback_on_step_end=record, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_folders_naming_the_former_transformer_module_still_load(tmp_path):
    """Folders saved before SiTTransformer2DModel moved to pipelines/ (the embedded digits base among them)
    record ``diffusers_am.models.sit_transformer`` in model_index.json: a fresh process loads one through
    SiTPipeline alone (diffusers resolves that name from sys.modules only), with the saved weights."""
    import subprocess

    folder = tmp_path / "saved-before"
    tiny_pixel_pipeline().save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers_am.pipelines.sit_transformer", "SiTTransformer2DModel"]
    index["transformer"][0] = "diffusers_am.models.sit_transformer"
    (folder / "model_index.json").write_text(json.dumps(index))
    code = (
        "import sys\nfrom diffusers_am.pipelines import SiTPipeline\n"
        "t = SiTPipeline.from_pretrained(sys.argv[1]).transformer\n"
        "print(type(t).__name__, float(sum(p.double().sum() for p in t.parameters())))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = float(sum(p.detach().double().sum() for p in tiny_pixel_transformer().parameters()))
    name, total = out.stdout.split()
    assert name == "SiTTransformer2DModel" and float(total) == expected
