#!/usr/bin/env python
"""Convert an official SiT checkpoint into a diffusers SiTPipeline folder.

    python scripts/convert_sit_checkpoint.py --checkpoint_path SiT-XL-2-256x256.pt \\
        --vae stabilityai/sd-vae-ft-ema --output_dir sit-xl-2-256

The folder loads with ``SiTPipeline.from_pretrained`` and trains with
``train_adjoint_matching.py --pretrained_model_name_or_path <folder>``. CFG guides the official
channels (the first 3 of 4 latent channels, as SiT's ``forward_with_cfg``) unless
``--guidance_channels all``. A bad checkpoint or argument prints one ``error:`` line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
"""``--dtype`` -> the torch dtype's name (torch, diffusers and the converter are imported in :func:`main`, after
bitsandbytes is held back: see :mod:`diffusers_am.bnb`)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint_path", required=True, help="SiT .pt state dict (or a train.py checkpoint with 'ema')."
    )
    parser.add_argument("--output_dir", required=True, help="where the SiTPipeline folder is written.")
    parser.add_argument(
        "--vae",
        default="stabilityai/sd-vae-ft-ema",
        help="AutoencoderKL folder or Hub id for latent models; 'none' for a pixel-space model.",
    )
    parser.add_argument("--num_attention_heads", type=int, default=None,
                        help="heads per block (default: from the official SiT size table).")
    parser.add_argument("--default_num_inference_steps", type=int, default=50)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights.")
    parser.add_argument(
        "--guidance_channels",
        default="official",
        help="CFG channel rule stored in the pipeline: 'official' (default; the first 3 latent channels, "
        "as SiT's forward_with_cfg), 'all' (standard CFG on every channel) or a channel count.",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from diffusers_am.bnb import bitsandbytes_deferred

    with bitsandbytes_deferred():  # the converter never quantizes
        return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    import torch

    from diffusers_am.errors import UserError
    from diffusers_am.models.sit_convert import convert_sit_checkpoint

    vae = None if args.vae.lower() == "none" else args.vae
    try:
        pipeline = convert_sit_checkpoint(
            args.checkpoint_path,
            args.output_dir,
            vae=vae,
            num_attention_heads=args.num_attention_heads,
            default_num_inference_steps=args.default_num_inference_steps,
            dtype=getattr(torch, DTYPES[args.dtype]),
            guidance_channels=args.guidance_channels,
        )
    except UserError as err:  # a bad input; anything else is a bug and keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = pipeline.transformer.config
    space = "latent" if pipeline.vae is not None else "pixel"
    guided = pipeline.config.guidance_channels
    print(
        f"wrote {args.output_dir}: SiT depth {cfg.num_layers}, "
        f"hidden {cfg.num_attention_heads * cfg.attention_head_dim}, "
        f"{cfg.num_classes} classes, {pipeline.resolution}px ({space} space), "
        f"CFG on {'all' if guided is None else f'the first {guided} of {cfg.in_channels}'} channels"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
