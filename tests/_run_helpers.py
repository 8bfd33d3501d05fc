"""Shared helpers of the trainer tests: a tiny SiT base, the tiny run's flags, folder snapshots, the log."""

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
