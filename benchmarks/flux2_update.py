#!/usr/bin/env python
"""Seconds and peak memory of one update on FLUX.2-klein-4B geometry, as ratios to the cost floor.

Builds a ``Flux2KleinPipeline`` in memory with random weights at the klein-4B geometry
(transformer, Qwen3-4B-geometry text encoder, FLUX.2 VAE; see ../shared/bench/README.md),
wraps it in :class:`diffusers_am.models.flux2.Flux2KleinAdapter` and times full updates of
AM-1, AM-3, AM-Full (ODE-AM with K = 1, 3, N) and DRaFT-1 exactly as the trainer runs them:
prompt encoding, the objective from :mod:`diffusers_am.objectives` (sampling, lean adjoint,
per-step backward) through the adapter, the reward on decoded pixels, gradient clipping and an
AdamW step on the LoRA (rank 32 on the floor's targets), under bf16 autocast. The reward is a
random CLIP ViT-H/14 vision tower (the floor's reward geometry) scored against a fixed
direction. The floor script (``gpu_floor.py``, passed by path with ``--floor``) runs in the
same job, and the table prints seconds / update and peak GiB with their ratios to it.

    python benchmarks/flux2_update.py --floor ../shared/bench/gpu_floor.py   # on a GPU
    python benchmarks/flux2_update.py --tiny                                  # CPU smoke test

``--tiny`` swaps in tiny components (same code path, seconds on a CPU) and skips the floor.
``--cache_prompt_embeddings``, ``--micro_batch_size``, ``--compile``, ``--gradient_checkpointing`` and
``--quantize_base`` run the trainer's options of the same names (one setting per job; the floor runs in each job).
``--quantize_base nf4 | int8`` writes the random pipeline with ``save_pretrained`` to a temporary folder and loads
it back the trainer's way (``Flux2KleinAdapter.from_pretrained(..., quantize_base=...)``: diffusers'
``PipelineQuantizationConfig`` on a GPU, the CPU swap with ``--tiny``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

KLEIN_4B = dict(
    patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
KLEIN_9B = dict(KLEIN_4B, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288)
"""FLUX.2-klein-9B transformer/config.json: the 4B's with 8 double + 24 single blocks of 32 heads x 128."""
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, vocab_size=151936, head_dim=128)
VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")

TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=48, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
)
TINY_QWEN3 = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=2, head_dim=8)
TINY_VIT = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8, projection_dim=8)
# floor's LoRA targets: attention and MLP projections of both block kinds
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_qkv_mlp_proj"]


def build_pipeline(tiny: bool, device: torch.device, dtype: torch.dtype):
    """A Flux2KleinPipeline (distilled) with random weights: klein-4B geometry or tiny."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from _tiny_pipelines import _tiny_vae_kwargs, tiny_qwen_tokenizer

    tokenizer = tiny_qwen_tokenizer()  # offline byte-level tokenizer; the ids stay below any vocab size
    qwen = dict(TINY_QWEN3, vocab_size=len(tokenizer)) if tiny else QWEN3_4B
    with torch.device(device):
        transformer = Flux2Transformer2DModel(**(TINY_TRANSFORMER if tiny else KLEIN_4B)).to(dtype)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**qwen, max_position_embeddings=1024)).to(dtype).eval()
        vae_kwargs = dict(latent_channels=1, use_quant_conv=False, use_post_quant_conv=False, **_tiny_vae_kwargs()) if tiny else {}
        vae = AutoencoderKLFlux2(**vae_kwargs).to(dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0, time_shift_type="exponential")
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, is_distilled=True)


class ClipDirectionReward(torch.nn.Module):
    """r(images [B, 3, H, W] in [0, 1]) = <CLIP image embed, fixed unit direction> / |embed|: a
    differentiable stand-in with the geometry of CLIP-based rewards (resize to 224, normalise)."""

    def __init__(self, tiny: bool, device: torch.device, dtype: torch.dtype):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        config = CLIPVisionConfig(**(TINY_VIT if tiny else VIT_H14))
        with torch.device(device):
            self.model = CLIPVisionModelWithProjection(config).to(dtype).eval().requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        direction = torch.randn(config.projection_dim, generator=gen)
        self.register_buffer("direction", (direction / direction.norm()).to(device))
        self.size = config.image_size
        self.register_buffer("mean", torch.tensor([0.4815, 0.4578, 0.4082], device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2686, 0.2613, 0.2758], device=device).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor, prompts: list) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = ((x - self.mean) / self.std).to(self.model.dtype)
        embeds = self.model(pixel_values=x).image_embeds.float()
        return embeds @ self.direction / embeds.norm(dim=-1).clamp_min(1e-6)


@dataclass
class Measurement:
    method: str
    seconds: float
    peak_gib: float | None


def bench_prompts(batch_size: int) -> list[str]:
    return [f"a photo of object {i}" for i in range(batch_size)]


def run_method(adapter, reward, optimizer, params, method: str, k: int, args, device: torch.device) -> Measurement:
    """Time ``args.repeats`` updates (after one warm-up) of one method, as the trainer runs them."""
    from diffusers_am.objectives import draft_step, ode_am_step
    from diffusers_am.training.update import BatchReward

    step_fn = draft_step if method.startswith("DRaFT") else ode_am_step
    times = adapter.time_grid(args.num_inference_steps, args.resolution)
    prompts = bench_prompts(args.batch_size)
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def update(seed: int) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        noise = adapter.initial_noise(args.batch_size, args.resolution, gen)
        with autocast:
            flow = adapter.flow(adapter.encode_conditions(prompts))
            step_fn(flow, noise, times, BatchReward(reward, adapter.decode, prompts), truncate_steps=k,
                    micro_batch_size=args.micro_batch_size)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    update(0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    durations = []
    for r in range(args.repeats):
        start = time.perf_counter()
        update(r + 1)
        if cuda:
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return Measurement(method, sorted(durations)[len(durations) // 2], peak)


def load_quantized(pipeline, args, device: torch.device, dtype: torch.dtype):
    """The trainer's loading route for ``--quantize_base``: the pipeline written to a temporary folder, freed,
    and loaded back by ``Flux2KleinAdapter.from_pretrained`` with the quantization (on ``device``)."""
    import gc

    from diffusers_am.models.flux2 import Flux2KleinAdapter

    with tempfile.TemporaryDirectory() as folder:
        pipeline.save_pretrained(folder)
        del pipeline
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        adapter = Flux2KleinAdapter.from_pretrained(
            folder, dtype=dtype, max_sequence_length=args.max_sequence_length, device=device,
            quantize_base=args.quantize_base, quantize_text_encoders=not args.cache_prompt_embeddings,
        )
    return adapter


def quantized_summary(pipeline) -> str:
    """Which components are quantized, and the transformer's resident bytes (weights, quantization state)."""
    from diffusers_am.models.quantize import describe

    tr = pipeline.transformer
    size = sum(t.numel() * t.element_size() for t in list(tr.parameters()) + list(tr.buffers()))
    for module in tr.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            size += state.absmax.numel() * state.absmax.element_size()
    return f"{describe(pipeline)}; transformer {size / 2**20:.1f} MiB"


def run_floor(floor_script: str, batch_size: int) -> dict:
    """Run the shared floor script (by path, unchanged) in a subprocess; return its JSON."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, OUT=out, B=str(batch_size))
        subprocess.run([sys.executable, floor_script], env=env, check=True)
        return json.loads((Path(out) / "gpu_floor.json").read_text())


def floor_seconds(floor: dict, method: str, k: int, n: int) -> float | None:
    if method.startswith("DRaFT"):
        return floor.get("floor_DRaFT_1_s")
    if f"floor_AM_{k}_s" in floor:
        return floor[f"floor_AM_{k}_s"]
    tail = sum(floor.get(key, 0.0) for key in ("t_vae_decode_bwd_s", "t_reward_vith14_bwd_s", "t_text_encode_s"))
    return n * floor["t_fwd_nograd_s"] + k * (floor["t_vjp_latent_s"] + floor["t_loss_step_s"]) + tail


def floor_peak_gib(floor: dict, checkpointing: bool) -> float | None:
    """The largest single unit cost's peak: the loss step (checkpointed or not), VJP, forward, decode."""
    loss = floor.get("mem_loss_step_ckpt_GiB" if checkpointing else "mem_loss_step_GiB")
    values = [v for v in (loss, floor.get("mem_vjp_GiB"), floor.get("mem_fwd_GiB"), floor.get("mem_vae_decode_bwd_GiB")) if v is not None]
    return max(values) if values else None


def table(rows: list[tuple[Measurement, float | None]], floor_peak: float | None, device_name: str) -> str:
    ratio = lambda a, b: "n/a" if a is None or not b else f"{a / b:.2f}"  # noqa: E731
    lines = [
        f"Device: {device_name}",
        "",
        "| method | s / update | floor s | time / floor | peak GiB | floor peak GiB | peak / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, floor_s in rows:
        peak = "n/a" if m.peak_gib is None else f"{m.peak_gib:.1f}"
        fp = "n/a" if floor_peak is None else f"{floor_peak:.1f}"
        fs = "n/a" if floor_s is None else f"{floor_s:.2f}"
        lines.append(f"| {m.method} | {m.seconds:.3f} | {fs} | {ratio(m.seconds, floor_s)} | {peak} | {fp} | {ratio(m.peak_gib, floor_peak)} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random components (CPU smoke test of the same code path); no floor")
    p.add_argument("--floor", default=None, help="path of ../shared/bench/gpu_floor.py, run in the same job (GPU only)")
    p.add_argument("--floor_json", default=None, help="use an existing floor JSON instead of running the script")
    p.add_argument("--batch_size", type=int, default=None, help="default 16 (tiny: 2)")
    p.add_argument("--resolution", type=int, default=None, help="default 256 (tiny: 32)")
    p.add_argument("--num_inference_steps", type=int, default=None, help="default 20 (tiny: 6)")
    p.add_argument("--repeats", type=int, default=2, help="timed updates per method after one warm-up (median)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--max_sequence_length", type=int, default=512, help="text tokens (the pipeline's and the floor's 512)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--micro_batch_size", type=int, default=None, help="adjoint / loss micro-batch (None: the batch)")
    p.add_argument("--cache_prompt_embeddings", action="store_true", help="encode once, free the text encoder")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the transformer blocks")
    p.add_argument("--compile_backend", default="inductor", choices=("inductor", "aot_eager", "eager"))
    p.add_argument("--quantize_base", default="none", choices=("none", "nf4", "int8"),
                   help="bitsandbytes base (transformer; text encoder too unless --cache_prompt_embeddings)")
    p.add_argument("--methods", default="AM-1,AM-3,AM-Full,DRaFT-1")
    p.add_argument("--output", default=None, help="write the table (markdown) and raw numbers (JSON) next to this .md path")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.tiny else 16)
    args.resolution = args.resolution or (32 if args.tiny else 256)
    args.num_inference_steps = args.num_inference_steps or (6 if args.tiny else 20)
    return args


def main(argv=None) -> int:
    from diffusers_am.models import LoraSettings
    from diffusers_am.models.flux2 import Flux2KleinAdapter

    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("error: no CUDA device; run with --tiny for the CPU smoke test.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    floor = json.loads(Path(args.floor_json).read_text()) if args.floor_json else None
    if floor is None and args.floor and cuda:
        floor = run_floor(args.floor, args.batch_size)
    dtype = torch.bfloat16 if cuda else torch.float32

    torch.manual_seed(0)
    pipeline = build_pipeline(args.tiny, device, dtype)
    adapter = Flux2KleinAdapter(pipeline, max_sequence_length=args.max_sequence_length)
    if args.quantize_base != "none":
        adapter = load_quantized(pipeline, args, device, dtype)
        pipeline = adapter.pipeline
        print(f"base quantized: {quantized_summary(pipeline)}", flush=True)
    for module in (pipeline.vae, pipeline.text_encoder):  # (the cache below may drop the text encoder)
        module.requires_grad_(False)
    singles = len(pipeline.transformer.single_transformer_blocks)
    targets = LORA_TARGETS + [f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles)]
    params = adapter.add_lora(LoraSettings(rank=args.rank, target_modules=targets, init_lora_weights="gaussian"))
    if args.gradient_checkpointing:
        pipeline.transformer.enable_gradient_checkpointing()
    if args.cache_prompt_embeddings:
        count, cached, freed = adapter.cache_prompts(bench_prompts(args.batch_size))
        print(f"prompt cache: {count} prompts ({cached / 2**20:.1f} MiB); text encoder freed: {freed / 2**30:.2f} GiB")
    if args.compile:
        from diffusers_am.training.engines import compile_repeated_blocks

        print(f"compiled {compile_repeated_blocks(pipeline.transformer, backend=args.compile_backend)} blocks")
    reward = ClipDirectionReward(args.tiny, device, dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    n = args.num_inference_steps
    ks = {"AM-1": 1, "AM-3": 3, "AM-Full": n, "DRaFT-1": 1}
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method not in ks:
            raise ValueError(f"`--methods`: unknown {method!r}; choose from {', '.join(ks)}.")
        k = min(ks[method], n)
        m = run_method(adapter, reward, optimizer, params, method, k, args, device)
        rows.append((m, floor_seconds(floor, method, k, n) if floor else None))
        print(f"{method}: {m.seconds:.3f} s/update" + (f", peak {m.peak_gib:.1f} GiB" if m.peak_gib else ""), flush=True)
    device_name = torch.cuda.get_device_name(0) if cuda else "CPU (tiny components: code-path check, not a benchmark)"
    header = (
        f"FLUX.2-klein-{'tiny' if args.tiny else '4B geometry'}, random weights, batch {args.batch_size}, "
        f"{args.resolution} px, {n} steps, LoRA rank {args.rank}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
        f", micro-batch {args.micro_batch_size or args.batch_size}"
        f", prompt cache {'on' if args.cache_prompt_embeddings else 'off'}"
        f", compile {args.compile_backend if args.compile else 'off'}"
        f", base {args.quantize_base}"
    )
    text = header + "\n\n" + table(rows, floor_peak_gib(floor, args.gradient_checkpointing) if floor else None, device_name)
    print("\n" + text)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        raw = {"args": vars(args), "floor": floor, "rows": [{"method": m.method, "seconds": m.seconds, "peak_gib": m.peak_gib, "floor_s": f} for m, f in rows]}
        from diffusers_am.jsonio import dumps
        out.with_suffix(".json").write_text(dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
