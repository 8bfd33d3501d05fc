"""FSDP2 through accelerate on 2 CPU processes (gloo) equals 1 process with gradient accumulation."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FLAGS = ["--num_inference_steps", "4", "--truncate_steps", "2", "--train_batch_size", "2", "--max_train_steps", "2",
         "--num_eval_samples", "2", "--validation_steps", "0", "--report_to", "none", "--rank", "2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_cpu_processes_match_one_process_accumulation(tmp_path):
    import torch.distributed as dist
    from safetensors.torch import load_file

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_FSDP="true", FSDP_VERSION="2",
               # the digits (DiT) forward calls a block's timestep embedder outside the block: shard the whole model
               FSDP_AUTO_WRAP_POLICY="NO_WRAP", FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT", FSDP_CPU_DUMP_AFTER="240")
    fsdp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(REPO / "tests" / "_fsdp_cpu_launch.py"), "--output_dir", str(tmp_path / "fsdp"), *FLAGS],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    one_env = {k: v for k, v in env.items() if not k.startswith(("ACCELERATE_USE_FSDP", "FSDP_"))}
    one = subprocess.run(
        [sys.executable, str(REPO / "train_adjoint_matching.py"), "--output_dir", str(tmp_path / "one"), *FLAGS,
         "--gradient_accumulation_steps", "2"],
        cwd=REPO, env=one_env, capture_output=True, text=True, timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(str(tmp_path / "fsdp" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 0  # it trained
