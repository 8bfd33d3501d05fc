"""Test helpers: the trainer on 2 CPU processes (gloo) under an accelerate engine set by environment
variables (FSDP2, DeepSpeed), through ``tests/_fsdp_cpu_launch.py``, and on 1 process with accumulation."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# --adam_epsilon 1 --learning_rate 1: Adam's first steps are lr * g / (|g| + eps), not about lr * sign(g) as at the
# default epsilon, so the compared adapters differ where the gradients' values differ, not only their signs
FLAGS = ["--num_inference_steps", "4", "--truncate_steps", "2", "--train_batch_size", "2", "--num_eval_samples", "2",
         "--validation_steps", "0", "--report_to", "none", "--rank", "2",
         "--adam_epsilon", "1.0", "--learning_rate", "1.0"]
ADAPTER = "pytorch_lora_weights.safetensors"
ENGINE_PREFIXES = ("ACCELERATE_USE_FSDP", "FSDP_", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_cmd(out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(REPO / "tests" / "_fsdp_cpu_launch.py"), "--output_dir", str(out), *FLAGS, *flags]


def engine_env(engine: dict[str, str]) -> dict[str, str]:
    """This process's environment without any engine variable, single-threaded, plus ``engine``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENGINE_PREFIXES)}
    return {**env, "OMP_NUM_THREADS": "1", **engine}


def two_process_run(out: Path, engine: dict[str, str], *flags: str) -> None:
    """train_adjoint_matching.py on 2 CPU processes under ``engine`` (2 prompts per process per update)."""
    done = subprocess.run(two_process_cmd(out, *flags), cwd=REPO, env=engine_env(engine), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def one_run(out: Path, *flags: str) -> None:
    """The same on 1 process with 2 accumulated micro-batches per update (the same 4 prompts)."""
    cmd = [sys.executable, str(REPO / "train_adjoint_matching.py"), "--output_dir", str(out), *FLAGS,
           "--gradient_accumulation_steps", "2", *flags]
    done = subprocess.run(cmd, cwd=REPO, env=engine_env({}), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def max_diff(a_path: Path, b_path: Path) -> float:
    """Max abs difference between two safetensors files with the same keys."""
    from safetensors.torch import load_file

    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
