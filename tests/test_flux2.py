"""FLUX.2-klein adapter and controlled pipeline on tiny random pipelines written to disk (offline)."""

import json
import warnings

import pytest
import torch
from _tiny_pipelines import TINY_RESOLUTION as RES
from _tiny_pipelines import save_tiny_flux2_klein
from _scripts import load_script

from diffusers_am.flow import sample_euler
from diffusers_am.models import LoraSettings, adapter_class, load_model_adapter
from diffusers_am.objectives import ode_am_step

N = 4
PROMPTS = ["a red cat", "a dog"]
SEQ = 32  # max_sequence_length for speed; the same value is passed to the stock pipeline
TOL = 1e-5  # fp32 on CPU: same ops in the same order, differences are rounding only


def stock_kwargs(**over):
    kw = dict(prompt=PROMPTS, height=RES, width=RES, num_inference_steps=N, output_type="pt", max_sequence_length=SEQ, guidance_scale=1.0)
    kw.update(over)
    return kw


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    return save_tiny_flux2_klein(tmp_path_factory.mktemp("klein"), is_distilled=True)


@pytest.fixture(scope="module")
def klein_base_dir(tmp_path_factory):
    return save_tiny_flux2_klein(tmp_path_factory.mktemp("klein-base"), is_distilled=False, seed=1)


@pytest.fixture(scope="module")
def trained(klein_dir, tmp_path_factory):
    """An adapter with a random (non-zero) LoRA, saved with save_lora."""
    adapter = load_model_adapter(klein_dir, max_sequence_length=SEQ)
    params = adapter.add_lora(LoraSettings(rank=4, init_lora_weights=False))
    out = tmp_path_factory.mktemp("lora")
    adapter.save_lora(str(out))
    return adapter, params, out


@pytest.fixture(scope="module")
def stock(klein_dir):
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline.from_pretrained(klein_dir)


def adapter_images(adapter, velocity="velocity", guidance_scale=None, prompts=PROMPTS):
    flow = adapter.flow(adapter.encode_conditions(prompts), guidance_scale=guidance_scale)
    x0 = adapter.initial_noise(len(prompts), RES, gen())
    x = sample_euler(getattr(flow, velocity), x0, adapter.time_grid(N, RES))[-1]
    return adapter.decode(x), x


def test_loader_dispatch_and_defaults(trained):
    adapter, params, _ = trained
    from diffusers_am.models.flux2 import Flux2KleinAdapter

    assert isinstance(adapter, Flux2KleinAdapter)
    assert adapter.default_num_inference_steps == 20 and adapter.default_resolution == 256
    assert adapter.conditioning == "text" and adapter.is_distilled
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    trainable = {n for n, p in adapter.transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("single_transformer_blocks.0.attn.to_out" in n for n in trainable)
    assert any("to_qkv_mlp_proj" in n for n in trainable)


def test_time_grid_is_one_minus_pipeline_sigmas(trained, stock):
    adapter = trained[0]
    stock(generator=gen(), **stock_kwargs())
    times = adapter.time_grid(N, RES)
    assert times.shape == (N + 1,) and times.dtype == torch.float32
    torch.testing.assert_close(times, 1 - stock.scheduler.sigmas.float(), atol=1e-7, rtol=0)
    assert times[0] == 0 and times[-1] == 1 and (times[1:] > times[:-1]).all()
    # dynamic shift: mu depends on the image sequence length
    assert not torch.allclose(adapter.time_grid(N, 4 * RES), times)


def test_paper_time_velocity_matches_scheduler_step(trained, stock):
    """One Euler step in paper time, x + (t_{k+1} - t_k) b(x, t_k), equals the stock scheduler's
    step on the model prediction the pipeline would compute (t = 1 - sigma, b = -v_model)."""
    import copy

    adapter = trained[0]
    encoded = adapter.encode_conditions(PROMPTS)
    flow = adapter.flow(encoded)
    times = adapter.time_grid(N, RES)
    x = adapter.initial_noise(2, RES, gen(3))
    stock(generator=gen(), **stock_kwargs())  # sets the scheduler's sigmas for N steps at RES
    for k in range(N):
        scheduler = copy.deepcopy(stock.scheduler)
        scheduler._step_index = None
        scheduler.set_begin_index(k)
        tokens = adapter.pack(x)
        with torch.no_grad(), adapter.adapters_disabled():
            model_out = adapter.transformer(
                hidden_states=tokens, timestep=scheduler.timesteps[k].expand(2) / 1000, guidance=None,
                encoder_hidden_states=encoded.prompt_embeds, txt_ids=encoded.text_ids,
                img_ids=stock._prepare_latent_ids(x), return_dict=False,
            )[0]
            stepped = adapter.unpack(scheduler.step(model_out, scheduler.timesteps[k], tokens, return_dict=False)[0], 2, 2)
            ours = x + (times[k + 1] - times[k]) * flow.base_velocity(x, times[k])
        torch.testing.assert_close(ours, stepped, atol=TOL, rtol=TOL)
        x = stepped


def test_base_trajectory_equals_stock_pipeline(trained, stock):
    """LoRA disabled: the adapter's Euler trajectory reproduces the stock pipeline's latents and images."""
    adapter = trained[0]
    images, x_n = adapter_images(adapter, "base_velocity")
    latents = stock(generator=gen(), **stock_kwargs(output_type="latent")).images
    vae = stock.vae
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    expected_state = stock._patchify_latents(latents)
    expected_state = (expected_state - vae.bn.running_mean.view(1, -1, 1, 1)) / std
    torch.testing.assert_close(x_n, expected_state, atol=TOL, rtol=TOL)
    torch.testing.assert_close(images, stock(generator=gen(), **stock_kwargs()).images, atol=TOL, rtol=0)


def test_saved_lora_loads_in_stock_pipeline_and_matches_controlled(trained, klein_dir):
    from diffusers import Flux2KleinPipeline
    from safetensors import safe_open

    from diffusers_am.pipelines import AdjointMatchingFlux2KleinPipeline

    adapter, _, lora_dir = trained
    weights = lora_dir / "pytorch_lora_weights.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert all(key.startswith("transformer.") for key in f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and "to_qkv_mlp_proj" in meta["transformer.target_modules"]

    pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    base = pipe(generator=gen(), **stock_kwargs()).images
    pipe.load_lora_weights(str(lora_dir))
    tuned = pipe(generator=gen(), **stock_kwargs()).images
    assert (tuned - base).abs().max() > 1e-3

    controlled = AdjointMatchingFlux2KleinPipeline.from_pretrained(klein_dir)
    controlled.load_lora_weights(str(lora_dir))
    out = controlled(generator=gen(), control_scale=1.0, control_window="all", **stock_kwargs())
    torch.testing.assert_close(out.images, tuned, atol=TOL, rtol=0)
    torch.testing.assert_close(adapter_images(adapter)[0], tuned, atol=TOL, rtol=0)
    # scale 0 is the base model; the LoRA is back on afterwards
    off = controlled(generator=gen(), control_scale=0.0, **stock_kwargs()).images
    torch.testing.assert_close(off, base, atol=TOL, rtol=0)
    torch.testing.assert_close(controlled(generator=gen(), **stock_kwargs()).images, tuned, atol=TOL, rtol=0)


def test_control_window_and_recording_match_adapter(trained, klein_dir):
    from diffusers_am.pipelines import AdjointMatchingFlux2KleinPipeline

    adapter, _, lora_dir = trained
    pipe = AdjointMatchingFlux2KleinPipeline.from_pretrained(klein_dir)
    pipe.load_lora_weights(str(lora_dir))
    k, scale = 2, 0.5
    out = pipe(generator=gen(), control_window=k, control_scale=scale, record_last_k=N, **stock_kwargs())
    assert out.states.shape == (N + 1, 2, 4, 2, 2) and out.times.shape == (N + 1,)
    flow = adapter.flow(adapter.encode_conditions(PROMPTS))
    times = adapter.time_grid(N, RES)
    torch.testing.assert_close(out.times, times, atol=1e-7, rtol=0)
    x = adapter.initial_noise(2, RES, gen())
    states = [x]
    with torch.no_grad():
        for i in range(N):
            b = flow.base_velocity(x, times[i])
            v = b + scale * (flow.velocity(x, times[i]) - b) if i >= N - k else b
            x = x + (times[i + 1] - times[i]) * v
            states.append(x)
    torch.testing.assert_close(out.states, torch.stack(states), atol=TOL, rtol=TOL)
    torch.testing.assert_close(out.images, adapter.decode(x), atol=TOL, rtol=0)
    last = pipe(generator=gen(), record_last_k=1, return_dict=False, **stock_kwargs())
    assert last[1].shape == (2, 2, 4, 2, 2) and last[2].tolist() == times[-2:].tolist()


def test_cfg_on_klein_base_matches_stock(klein_base_dir):
    from diffusers import Flux2KleinPipeline

    adapter = load_model_adapter(klein_base_dir, max_sequence_length=SEQ)
    assert not adapter.is_distilled and adapter.resolve_guidance(None) == 4.0
    images = adapter_images(adapter, "base_velocity", guidance_scale=3.0)[0]
    stock = Flux2KleinPipeline.from_pretrained(klein_base_dir)
    expected = stock(generator=gen(), **stock_kwargs(guidance_scale=3.0)).images
    torch.testing.assert_close(images, expected, atol=TOL, rtol=0)
    no_cfg = adapter_images(adapter, "base_velocity", guidance_scale=1.0)[0]
    assert (no_cfg - expected).abs().max() > 1e-4


def test_ode_am_step_trains_lora(trained):
    adapter, params, _ = trained
    flow = adapter.flow(adapter.encode_conditions(PROMPTS))
    for p in params:
        p.grad = None
    out = ode_am_step(
        flow, adapter.initial_noise(2, RES, gen(5)), adapter.time_grid(N, RES),
        lambda x: adapter.decode(x).mean(dim=(1, 2, 3)), truncate_steps=2, reward_scale=10.0,
    )
    assert out.reward.shape == (2,) and out.control_norm_per_step.shape == (2,) and out.final_states.shape == (2, 4, 2, 2)
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    # the value: tests/_ode_am_reference.py (autograd through the base with the transformer's own switch)
    from _ode_am_reference import ode_am_reference

    loss, expected = ode_am_reference(
        adapter, flow, adapter.initial_noise(2, RES, gen(5)), adapter.time_grid(N, RES),
        lambda x: adapter.decode(x).mean(dim=(1, 2, 3)), params, truncate_steps=2, reward_scale=10.0,
    )
    assert out.loss == pytest.approx(loss, rel=1e-4)
    scale = max(float(g.abs().max()) for g in expected)
    assert scale > 0
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-4 * scale, rtol=1e-4)


def test_distilled_guidance_warns(trained):
    adapter = trained[0]
    encoded = adapter.encode_conditions(PROMPTS[:1])
    with pytest.warns(UserWarning, match="ignored for step-wise distilled"):
        adapter.flow(encoded, guidance_scale=4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.flow(encoded)


def test_bad_inputs(trained, klein_dir):
    from diffusers_am.pipelines import AdjointMatchingFlux2KleinPipeline

    adapter, _, lora_dir = trained
    with pytest.raises(ValueError, match="multiple of 16"):
        adapter.time_grid(N, 40)
    with pytest.raises(ValueError, match="multiple of 16"):
        adapter.initial_noise(1, 24, None)
    with pytest.raises(ValueError, match="num_inference_steps"):
        adapter.time_grid(0, RES)
    with pytest.raises(ValueError, match="supported pipelines: .*Flux2KleinPipeline"):
        adapter_class("KandinskyPipeline")
    with pytest.raises(ValueError, match="conditions"):
        adapter.encode_conditions([3])
    with pytest.raises(ValueError, match="already has a LoRA"):
        adapter.add_lora(LoraSettings(rank=2))
    fresh = load_model_adapter(klein_dir, max_sequence_length=SEQ)
    with pytest.raises(ValueError, match="'to_nowhere'"):
        fresh.add_lora(LoraSettings(rank=2, target_modules=["to_q", "to_nowhere"]))
    with pytest.raises(ValueError, match="no LoRA adapter to save"):
        fresh.save_lora(str(lora_dir / "none"))
    pipe = AdjointMatchingFlux2KleinPipeline.from_pretrained(klein_dir)
    with pytest.raises(ValueError, match="larger than num_inference_steps"):
        pipe(generator=gen(), control_window=N + 1, **stock_kwargs())
    with pytest.raises(ValueError, match="record_last_k"):
        pipe(generator=gen(), record_last_k=N + 1, **stock_kwargs())
    with pytest.raises(ValueError, match="control_window"):
        pipe(generator=gen(), control_window="last", **stock_kwargs())


def _trainer_main():
    return load_script("train_adjoint_matching.py", "train_adjoint_matching", register=False).main


@pytest.mark.parametrize("method", ["ode-am", "sde-am", "draft", "refl"])
def test_trainer_runs_each_method_on_tiny_klein(method, klein_dir, stock, tmp_path):
    """train_adjoint_matching.py end to end on the tiny klein folder: 2 updates, K=2 of N=3. At --adam_beta1 0 and
    --adam_epsilon = --learning_rate = 1e6 each Adam step is minus the clipped gradient (to ~1e-6), so each
    update's change of the adapter (checkpoint-1 minus the zero-B start, then the final minus checkpoint-1) has
    the norm min(grad_norm, max_grad_norm) of its log record; ode-am's reward_before / reward_after are the eval
    set's mean brightness from the stock Flux2KleinPipeline without / with the saved LoRA."""
    from pathlib import Path

    from safetensors.torch import load_file

    from diffusers_am.prompts import derive_seed

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na dog\n")
    out = tmp_path / "out"
    reward = f"{Path(__file__).resolve().parent / '_tiny_pipelines.py'}:mean_brightness"
    clip = 0.2
    status = _trainer_main()([
        "--pretrained_model_name_or_path", str(klein_dir), "--method", method, "--truncate_steps", "2",
        "--num_inference_steps", "3", "--resolution", str(RES), "--reward", reward, "--prompts", str(prompts),
        "--train_batch_size", "2", "--max_train_steps", "2", "--validation_steps", "0", "--validation_prompts", "a dog",
        "--num_eval_samples", "2" if method == "ode-am" else "0", "--checkpointing_steps", "1",
        "--learning_rate", "1e6", "--adam_epsilon", "1e6", "--adam_beta1", "0", "--max_grad_norm", str(clip),
        "--num_validation_images", "1", "--report_to", "none", "--rank", "2", "--output_dir", str(out),
        "--max_sequence_length", str(SEQ), "--reward_scale", "1000",
    ])
    assert status == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    updates = [r for r in log if "loss" in r]
    assert len(updates) == 2 and all(r["loss"] == r["loss"] and not r["skipped"] for r in updates)
    first = load_file(str(out / "checkpoint-1" / "pytorch_lora_weights.safetensors"))
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert weights and first.keys() == weights.keys() and all(k.startswith("transformer.") for k in weights)
    changes = [
        sum(float(v.double().pow(2).sum()) for k, v in first.items() if "lora_B" in k) ** 0.5,  # A: no gradient
        sum(float((weights[k].double() - first[k].double()).pow(2).sum()) for k in weights) ** 0.5,
    ]
    for change, record in zip(changes, updates):
        assert change == pytest.approx(min(record["grad_norm"], clip), rel=1e-5)
    if method == "ode-am":
        summary = json.loads((out / "train_summary.json").read_text())

        def eval_reward():
            generator = gen(derive_seed(0, "eval"))
            return float(stock(generator=generator, **stock_kwargs(num_inference_steps=3)).images.double().mean())

        assert summary["reward_before"] == pytest.approx(eval_reward(), abs=1e-6)
        stock.load_lora_weights(str(out))
        try:
            assert summary["reward_after"] == pytest.approx(eval_reward(), abs=1e-6)
        finally:
            stock.unload_lora_weights()
        assert abs(summary["reward_after"] - summary["reward_before"]) > 1e-5  # 10x the tolerance: it trained


def test_benchmark_script_tiny_code_path(tmp_path, monkeypatch):
    """benchmarks/flux2_update.py --tiny runs the GPU benchmark's code path on CPU."""
    module = load_script("benchmarks/flux2_update.py", "flux2_update", monkeypatch=monkeypatch)
    out = tmp_path / "table.md"
    argv = ["--tiny", "--num_inference_steps", "2", "--repeats", "1", "--methods", "AM-1,AM-Full,DRaFT-1",
            "--max_sequence_length", "16", "--rank", "2", "--output", str(out)]
    assert module.main(argv) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["AM-1", "AM-Full", "DRaFT-1"] and all(r["seconds"] > 0 for r in rows)
    assert "| AM-Full |" in out.read_text()
    opts = ["--micro_batch_size", "1", "--cache_prompt_embeddings", "--compile", "--compile_backend", "eager",
            "--gradient_checkpointing", "--quantize_base", "nf4", "--output", str(tmp_path / "opts.md")]
    assert module.main(argv[:-2] + opts) == 0
    assert "micro-batch 1, prompt cache on, compile eager, base nf4" in (tmp_path / "opts.md").read_text()
    with pytest.raises(ValueError, match="--methods"):
        module.main(argv[:-2] + ["--methods", "AM-7"])
    floor = {"t_fwd_nograd_s": 1.0, "t_vjp_latent_s": 2.0, "t_loss_step_s": 3.0, "floor_AM_1_s": 9.0}
    assert module.floor_seconds(floor, "AM-1", 1, 20) == 9.0
    assert module.floor_seconds(floor, "AM-5", 5, 20) == 20 * 1.0 + 5 * (2.0 + 3.0)


def test_offloaded_text_encoder_gives_same_embeddings(klein_base_dir):
    """The reference calls the saved tokenizer and Qwen3 text encoder directly, as FLUX.2-klein conditions on
    them: each prompt as a user chat turn (generation prompt, thinking off), padded to the sequence length; per
    token the hidden states of layers 9, 18 and 27 side by side."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    adapter = load_model_adapter(klein_base_dir, max_sequence_length=SEQ, offload_text_encoder=True)
    encoded = adapter.encode_conditions(PROMPTS)
    assert encoded.negative_prompt_embeds.shape[0] == 1 and adapter.pipeline.text_encoder.device.type == "cpu"
    again = adapter.encode_conditions(PROMPTS)
    assert again.negative_prompt_embeds is encoded.negative_prompt_embeds  # the empty prompt is cached
    tokenizer = AutoTokenizer.from_pretrained(klein_base_dir / "tokenizer")
    encoder = Qwen3ForCausalLM.from_pretrained(klein_base_dir / "text_encoder").eval()
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False) for p in PROMPTS]
    tokens = tokenizer(chats, return_tensors="pt", padding="max_length", truncation=True, max_length=SEQ)
    with torch.no_grad():
        hidden = encoder(**tokens, output_hidden_states=True, use_cache=False).hidden_states  # embeddings + 28 layers
    expected = torch.cat([hidden[9], hidden[18], hidden[27]], dim=-1)  # [B, SEQ, 3 * 16]
    assert expected.shape == (len(PROMPTS), SEQ, 48)
    torch.testing.assert_close(encoded.prompt_embeds, expected)
