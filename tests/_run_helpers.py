"""Shared helpers of the trainer tests: a tiny SiT base, the tiny run's flags, folder snapshots, the log, a
trained adapter's tensors and their difference."""

import hashlib
import json
from pathlib import Path

import pytest

import train_adjoint_matching as script


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from _tiny_sit import tiny_pixel_pipeline

    path = tmp_path_factory.mktemp("tiny-sit")
    tiny_pixel_pipeline().save_pretrained(str(path))
    return path


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_args(base, out, *extra):
    return [
        "--pretrained_model_name_or_path",
        str(base),
        "--output_dir",
        str(out),
        "--num_inference_steps",
        "4",
        "--truncate_steps",
        "2",
        "--train_batch_size",
        "3",
        "--max_train_steps",
        "2",
        "--num_eval_samples",
        "4",
        "--num_validation_images",
        "2",
        "--validation_prompts",
        "1",
        "7",
        "--validation_steps",
        "0",
        "--report_to",
        "none",
        "--rank",
        "2",
        *extra,
    ]


def run(base, out, *extra):
    return script.main(tiny_args(base, out, *extra))


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def trained_adapter(out: Path, *args: str) -> dict:
    """Run the trainer in-process (``diffusers_am.train.main``) into ``out``; return the saved adapter's tensors
    after checking that they are finite and that it trained (LoRA B starts at 0)."""
    import torch
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from diffusers_am.train import main

    assert main(["--output_dir", str(out), *args]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert max(float(v.abs().max()) for k, v in weights.items() if "lora_B" in k) > 0
    return weights


def max_abs_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two adapters' tensors (same keys), in fp32."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
