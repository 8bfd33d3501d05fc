"""Train ``shapes-klein``: a FLUX.2-klein in miniature on the shapes captions, in the stock format.

Writes ``diffusers_am/assets/shapes-klein/`` (``Flux2KleinPipeline.save_pretrained``): a word-level
byte-BPE ``Qwen2Tokenizer`` and a random-init ``Qwen3ForCausalLM`` text encoder (both built here,
offline, seeded), an ``AutoencoderKLFlux2`` trained for reconstruction, and a
``Flux2Transformer2DModel`` trained by rectified flow on the VAE latents of the training
compositions (:mod:`diffusers_am.toy.shapes`), plus ``diffusers_am_defaults.json`` (the defaults
``--pretrained shapes-klein`` runs with), ``prompts_train.txt`` / ``prompts_heldout.txt``,
``quality.json`` and ``README.md``.

    python scripts/train_shapes_klein.py                 # everything (VAE, transformer, measure)
    python scripts/train_shapes_klein.py --eval_only     # re-measure the shipped folder

Stages can be rerun alone: ``--stage vae`` (tokenizer, text encoder, VAE) then ``--stage transformer``
(reads the VAE and text encoder from ``--output_dir``). Seeds fix everything; on 2 shared CPU cores
the run times are in the folder's README.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers_am.jsonio import dumps
from diffusers_am.toy.shapes import (
    COLOURS,
    RESOLUTION,
    SHAPES,
    gold_check,
    heldout_captions,
    make_dataset,
    train_captions,
)

ASSETS = Path(__file__).resolve().parent.parent / "diffusers_am" / "assets"
OUTPUT = ASSETS / "shapes-klein"
MAX_SEQUENCE_LENGTH = 24
TEXT_LAYERS = (9, 18, 27)
DEFAULTS_NAME = "diffusers_am_defaults.json"

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


# -- text side -------------------------------------------------------------------------------
def build_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE) with merges that make every caption word one token
    ("Ġred", "Ġcircle", ...), the chat markers as special tokens and Qwen's chat template."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    words = ["Ġ" + w for w in (*COLOURS, *SHAPES, "to", "the", "left", "of", "a")] + ["user", "assistant"]
    for word in words:
        current = word[0]
        for ch in word[1:]:
            pair = (current, ch)
            current = current + ch
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(current, len(vocab))
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def build_text_encoder(vocab_size: int, seed: int):
    """Random-init Qwen3 (28 layers so that the pipeline's hidden layers 9, 18, 27 exist; width 32)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, vocab_size=vocab_size, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config).eval()


# -- VAE -------------------------------------------------------------------------------------
def build_vae(seed: int):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    return AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int) -> dict:
    """Reconstruction (L1 + MSE on [-1, 1] pixels) of posterior samples plus a small KL term."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    start, log = time.perf_counter(), []
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        x = images[idx] * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + F.mse_loss(rec, x) + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.append((step, round(float(loss), 4)))
            print(f"vae step {step}: loss {float(loss):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    vae.eval()
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "seed": seed,
            "seconds": round(time.perf_counter() - start, 1), "loss_log": log}


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means, patchified: [N, 4 * latent_channels, H/8, W/8] (not yet normalised)."""
    out = []
    for s in range(0, images.shape[0], batch_size):
        mean = pipe.vae.encode(images[s : s + batch_size] * 2 - 1).latent_dist.mean
        out.append(pipe._patchify_latents(mean))
    return torch.cat(out)


# -- transformer -----------------------------------------------------------------------------
def build_transformer(seed: int):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=3,
        joint_attention_dim=3 * 32, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(8, 8, 8, 8),
        guidance_embeds=False,
    )


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, ids = pipe.encode_prompt(
        prompt=captions, device=torch.device("cpu"), max_sequence_length=MAX_SEQUENCE_LENGTH, text_encoder_out_layers=TEXT_LAYERS
    )
    return embeds.float(), ids


def train_transformer(pipe, latents: torch.Tensor, caption_index: torch.Tensor, embeds: torch.Tensor, txt_ids: torch.Tensor,
                      empty: torch.Tensor, steps: int, batch_size: int, lr: float, drop: float, ema_decay: float,
                      seed: int) -> tuple[torch.nn.Module, dict]:
    """Rectified flow in the pipeline's sigma convention: x_s = (1 - s) x0 + s eps, target eps - x0,
    s from a logit-normal / uniform mix; the caption replaced by the empty prompt with prob. ``drop``
    (for CFG). Returns the EMA transformer."""
    model = pipe.transformer
    generator = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05, final_div_factor=10)
    b, c, h, w = batch_size, *latents.shape[1:]
    img_ids = pipe._prepare_latent_ids(latents[:b])
    model.train()
    start, log = time.perf_counter(), []
    for step in range(steps):
        idx = torch.randint(0, latents.shape[0], (b,), generator=generator)
        x0 = latents[idx]
        cond = embeds[caption_index[idx]]
        dropped = torch.rand(b, generator=generator) < drop
        cond = torch.where(dropped.view(b, 1, 1), empty.expand(b, -1, -1), cond)
        u = torch.rand(b, generator=generator)
        logit_normal = torch.sigmoid(torch.randn(b, generator=generator))
        sigma = torch.where(u < 0.5, logit_normal, torch.rand(b, generator=generator))
        eps = torch.randn(x0.shape, generator=generator)
        xs = (1 - sigma.view(b, 1, 1, 1)) * x0 + sigma.view(b, 1, 1, 1) * eps
        tokens = xs.reshape(b, c, h * w).permute(0, 2, 1)
        pred = model(hidden_states=tokens, timestep=sigma, guidance=None, encoder_hidden_states=cond,
                     txt_ids=txt_ids[:1].expand(b, -1, -1), img_ids=img_ids, return_dict=False)[0]
        target = (eps - x0).reshape(b, c, h * w).permute(0, 2, 1)
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - ema_decay)
        if step % 200 == 0 or step == steps - 1:
            log.append((step, round(float(loss), 4)))
            print(f"transformer step {step}: loss {float(loss):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "caption_dropout": drop, "ema_decay": ema_decay,
              "seed": seed, "seconds": round(time.perf_counter() - start, 1), "loss_log": log,
              "num_parameters": sum(p.numel() for p in model.parameters())}
    return ema.eval(), record


# -- measuring -------------------------------------------------------------------------------
@torch.no_grad()
def sample_stock(folder: Path, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 64) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] from the unmodified Flux2KleinPipeline loaded from ``folder``."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, len(prompts), batch):
        out.append(pipe(prompt=prompts[s : s + batch], height=RESOLUTION, width=RESOLUTION, num_inference_steps=steps,
                        guidance_scale=guidance, generator=generator, max_sequence_length=MAX_SEQUENCE_LENGTH,
                        output_type="pt").images)
    return torch.cat(out).float()


def measure(folder: Path, steps: int, guidances: list[float], per_prompt: int, seed: int) -> dict:
    rows = {}
    for g in guidances:
        row = {}
        for split, caps in (("train", train_captions()), ("heldout", heldout_captions())):
            prompts = [c for c in caps for _ in range(per_prompt)]
            t0 = time.perf_counter()
            images = sample_stock(folder, prompts, seed, steps, g)
            row[split] = round(float(gold_check(images, prompts).float().mean()), 4)
            row[f"{split}_n"] = len(prompts)
            row[f"{split}_seconds"] = round(time.perf_counter() - t0, 1)
        rows[str(g)] = row
        print(f"guidance {g}: gold exact match train {row['train']:.3f}, held-out {row['heldout']:.3f}", flush=True)
    return {"num_inference_steps": steps, "per_prompt": per_prompt, "seed": seed, "gold_exact_match": rows}


def write_card(out: Path, record: dict, quality: dict | None) -> None:
    """The folder's README.md: what it is, how it was trained, how good it is, how to load it."""
    rows = ""
    if quality:
        for g, row in quality["gold_exact_match"].items():
            rows += (f"| {g} | {row['train']:.3f} ({row['train_n']}) | {row['heldout']:.3f} ({row['heldout_n']}) | "
                     f"{row['train_seconds'] + row['heldout_seconds']:.0f} |\n")
    vae, tr, data = record.get("vae", {}), record.get("transformer", {}), record.get("data", {})
    size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    text = f"""# shapes-klein: FLUX.2-klein in miniature

A text-to-image FLUX.2-klein (klein-base layout: `is_distilled = false`, CFG available) trained here, on two
CPU cores, on the procedural shapes captions of `diffusers_am.toy.shapes` ("a red circle to the left of a
blue square": 4 colours x 3 shapes on each side, 32 x 32 RGB). Every component is a stock class saved with
`save_pretrained`; the unmodified `diffusers.Flux2KleinPipeline.from_pretrained` loads it. Short name
`shapes-klein` (`--pretrained shapes-klein`, `python -m diffusers_am.evaluate --pretrained shapes-klein`).

- Tokenizer: `Qwen2Tokenizer`, byte-level BPE built offline with merges that make each caption word one
  token, Qwen's chat markers and template. Text encoder: `Qwen3ForCausalLM`, 28 layers of width 32,
  **random init** (not trained; its hidden states 9, 18, 27 differ per caption, which is all the
  transformer needs). Captions are 24 tokens: use `max_sequence_length={MAX_SEQUENCE_LENGTH}` (the pipeline pads to it
  and the transformer was trained on that length).
- VAE: `AutoencoderKLFlux2`, 3 blocks (16, 32, 64), 4 latent channels (4x down-sampling, patchified to
  16 channels on a 4 x 4 token grid), trained {vae.get('steps')} steps (batch 24, L1 + MSE + 1e-6 KL, lr 3e-3) in
  {vae.get('seconds')} s, then {record.get('vae_refine', {}).get('steps')} more at lr 1e-3 in
  {record.get('vae_refine', {}).get('seconds')} s; batch-norm statistics set to the data's latents. Reconstructions: gold exact
  match {vae.get('reconstruction_gold')}, mean L1 {vae.get('reconstruction_l1')} on 256 training images.
- Transformer: `Flux2Transformer2DModel`, 2 double + 2 single blocks, 3 heads x 32, {tr.get('num_parameters')} parameters;
  rectified flow on the normalised latents of {data.get('images')} training images (120 compositions x
  {data.get('per_composition')} layouts, 24 compositions held out), caption dropout {tr.get('caption_dropout')} (for CFG),
  {tr.get('steps')} steps of batch {tr.get('batch_size')}, AdamW one-cycle lr {tr.get('lr')}, EMA {tr.get('ema_decay')}, in {tr.get('seconds')} s.
- Defaults (`diffusers_am_defaults.json`): {quality['num_inference_steps'] if quality else '?'} steps; training: reward `shapes`, the 120
  training captions (`prompts_train.txt`), validation on 6 held-out captions with the `shapes-gold` judge;
  evaluation: the 24 held-out captions (`prompts_heldout.txt`), rewards `shapes-gold`, `shapes`, `shapes-heldout`.
- Size: {size_mb:.1f} MB.

## Quality

Gold exact match (`diffusers_am.toy.shapes.gold_check`: colour segmentation and shape / position measured on
the pixels) of samples of the stock pipeline from this folder, {quality['per_prompt'] if quality else '?'} per caption, seed 1234:

| guidance | training captions (n) | held-out compositions (n) | seconds |
|---|---|---|---|
{rows}
Reproduce: `python scripts/train_shapes_klein.py` (all), `--eval_only` (measure only).

```python
import torch
from diffusers import Flux2KleinPipeline
from diffusers_am.models import EMBEDDED_SHAPES_KLEIN

pipe = Flux2KleinPipeline.from_pretrained(EMBEDDED_SHAPES_KLEIN)
images = pipe(prompt="a red circle to the left of a blue square", height=32, width=32,
              num_inference_steps=20, guidance_scale=1.0, max_sequence_length={MAX_SEQUENCE_LENGTH}).images
```
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=OUTPUT)
    parser.add_argument("--stage", choices=("all", "vae", "vae-refine", "transformer"), default="all")
    parser.add_argument("--eval_only", action="store_true")
    parser.add_argument("--per_composition", type=int, default=24, help="training images per training composition")
    parser.add_argument("--vae_steps", type=int, default=300)
    parser.add_argument("--vae_refine_steps", type=int, default=300, help="second VAE phase (lr 1e-3, another data order)")
    parser.add_argument("--transformer_steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="the default written to the folder")
    parser.add_argument("--eval_guidances", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--eval_per_prompt", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: Path = args.output_dir
    record_path = out / "training_record.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    if not args.eval_only:
        t0 = time.perf_counter()
        data = make_dataset(args.per_composition, "train", seed=0)
        record["data"] = {"per_composition": args.per_composition, "images": int(data.images.shape[0]), "seed": 0,
                          "seconds": round(time.perf_counter() - t0, 1)}
        print(f"data: {data.images.shape[0]} images ({record['data']['seconds']} s)", flush=True)
        if args.stage in ("all", "vae", "vae-refine"):
            if args.stage == "vae-refine":  # the second phase alone, on the folder's VAE after the first
                pipe = Flux2KleinPipeline.from_pretrained(out)
                vae = pipe.vae
            else:
                tokenizer = build_tokenizer()
                text_encoder = build_text_encoder(len(tokenizer), seed=0)
                vae = build_vae(seed=0)
                record["vae"] = train_vae(vae, data.images, args.vae_steps, 24, 3e-3, 1e-6, seed=0)
                transformer = build_transformer(seed=0)
                scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0, time_shift_type="exponential")
                pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                          transformer=transformer, is_distilled=False)
            if args.stage != "vae" or args.vae_refine_steps:
                # phase 2: lower learning rate, another data order
                record["vae_refine"] = train_vae(vae, data.images, args.vae_refine_steps, 24, 1e-3, 1e-6, seed=1)
            with torch.no_grad():  # batch-norm statistics of the patchified latents (what the pipeline un-normalises with)
                lat = encode_latents(pipe, data.images)
                vae.bn.running_mean.copy_(lat.mean(dim=(0, 2, 3)))
                vae.bn.running_var.copy_(lat.var(dim=(0, 2, 3)))
                rec = vae.decode(pipe._unpatchify_latents(lat[:256])).sample.clamp(-1, 1) * 0.5 + 0.5
                record["vae"]["reconstruction_gold"] = round(float(gold_check(rec, data.captions[:256]).float().mean()), 4)
                record["vae"]["reconstruction_l1"] = round(float((rec - data.images[:256]).abs().mean()), 4)
            print(f"vae: reconstructions gold {record['vae']['reconstruction_gold']}, L1 {record['vae']['reconstruction_l1']}")
            out.mkdir(parents=True, exist_ok=True)
            pipe.save_pretrained(out)
        else:
            pipe = Flux2KleinPipeline.from_pretrained(out)
        if args.stage in ("all", "transformer"):
            pipe.transformer = build_transformer(seed=0)
            caps = train_captions()
            cap_index = torch.tensor([caps.index(c) for c in data.captions])
            embeds, txt_ids = encode_captions(pipe, caps)
            empty, _ = encode_captions(pipe, [""])
            with torch.no_grad():
                mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
                std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
                latents = (encode_latents(pipe, data.images) - mean) / std
            ema, record["transformer"] = train_transformer(
                pipe, latents, cap_index, embeds, txt_ids, empty, args.transformer_steps, args.batch_size, 1e-3, 0.1,
                0.995, seed=0)
            pipe.transformer = ema
            pipe.save_pretrained(out)
        defaults = {
            "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale,
            "resolution": RESOLUTION,
            "training": {
                "reward": "shapes",
                "prompts": "prompts_train.txt",
                "validation_prompts": heldout_captions()[:6],
                "validation_reward": "shapes-gold",
                "validation_features": "shapes-heldout",
                "num_inference_steps": args.num_inference_steps,
                "guidance_scale": args.guidance_scale,
                "resolution": RESOLUTION,
                "max_sequence_length": MAX_SEQUENCE_LENGTH,
            },
            "evaluate": {
                "prompts": "prompts_heldout.txt",
                "rewards": ["shapes-gold", "shapes", "shapes-heldout"],
                "feature_extractor": "shapes-heldout",
                "num_inference_steps": args.num_inference_steps,
                "guidance_scale": args.guidance_scale,
                "resolution": RESOLUTION,
                "max_sequence_length": MAX_SEQUENCE_LENGTH,
            },
        }
        (out / DEFAULTS_NAME).write_text(dumps(defaults, indent=2) + "\n")
        (out / "prompts_train.txt").write_text("\n".join(train_captions()) + "\n")
        (out / "prompts_heldout.txt").write_text("\n".join(heldout_captions()) + "\n")
        record_path.write_text(dumps(record, indent=2) + "\n")
    if args.eval_only or args.stage in ("all", "transformer"):
        quality = measure(out, args.num_inference_steps, args.eval_guidances, args.eval_per_prompt, seed=1234)
        (out / "quality.json").write_text(dumps(quality, indent=2) + "\n")
        write_card(out, record, quality)


if __name__ == "__main__":
    main()
