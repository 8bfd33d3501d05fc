"""Fine-tune from Python: a loaded pipeline, a reward callable, a list of class labels, a peft LoraConfig and a
callback, handed to ``AdjointMatchingTrainer`` as objects (no reward registry, no prompts file).

The reward is a plain differentiable function: the mean brightness of the image's centre (the digits base
draws light strokes on a dark background, so it asks for bolder digits). A few updates take well under a
minute on a CPU:

    python examples/train_from_python.py --output_dir outputs/from-python --max_train_steps 3
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch
from peft import LoraConfig

from diffusers_am import AdjointMatchingTrainer, SiTPipeline, TrainingConfig
from diffusers_am.models import EMBEDDED_DIGITS_BASE


def centre_brightness(images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
    """Reward [B]: mean of the central half of images [B, C, H, W] in [0, 1] (differentiable)."""
    h, w = images.shape[-2:]
    return images[..., h // 4 : h - h // 4, w // 4 : w - w // 4].mean(dim=(1, 2, 3))


class PrintUpdates:
    """A callback: one line per update (main process only)."""

    def on_update_end(self, trainer: AdjointMatchingTrainer, step: int, record: dict) -> None:
        if trainer.accelerator.is_main_process:
            print(f"update {step}: reward {record['reward_mean']:.4f}, loss {record['loss']:.4g}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/from-python")
    parser.add_argument("--max_train_steps", type=int, default=3)
    args = parser.parse_args(argv)

    pipeline = SiTPipeline.from_pretrained(EMBEDDED_DIGITS_BASE)  # any supported pipeline, loaded your way
    config = TrainingConfig(
        output_dir=args.output_dir,
        overwrite_output_dir=True,
        max_train_steps=args.max_train_steps,
        train_batch_size=8,
        truncate_steps=4,
        reward_scale=20.0,
        num_eval_samples=16,
        validation_steps=0,
        report_to="none",
    )
    trainer = AdjointMatchingTrainer(
        config,
        pipeline=pipeline,
        reward=centre_brightness,
        prompts=[3, 5, 8],  # class labels of the digits base (strings for a text-to-image pipeline)
        lora_config=LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
        callbacks=[PrintUpdates()],
    )
    result = trainer.train()
    print(f"reward before {result.reward_before:.4f}, after {result.reward_after:.4f} ({result.steps} updates)")
    print(f"adapter: {result.adapter_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
