"""DeepSpeed ZeRO-2 through accelerate on 2 CPU processes (gloo): its adapter, checkpoints (with the EMA) and
resume equal 1 process with gradient accumulation. DeepSpeed is in the `test` extra (no dependency of
diffusers-am itself): the test fails, not skips, where it is missing."""

import subprocess
import sys

import pytest
from _dist_cpu import ADAPTER, engine_env, max_diff, one_run, two_process_run

import deepspeed  # noqa: F401  (`pip install -e ".[test]"`)

# DS_ACCELERATOR=cpu: DeepSpeed's CPU accelerator (gloo), also on a machine with a GPU
DEEPSPEED_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "DS_ACCELERATOR": "cpu",
                 "FSDP_CPU_DUMP_AFTER": "240"}


@pytest.fixture(scope="module")
def shm_comm_op_built():
    """DeepSpeed's CPU backend compiles its shared-memory op (C++, torch's JIT extension cache) when a process group
    starts: about 1.5 CPU-minutes the first time on a machine, then cached. Build it here, in one process and
    without the 2-process run's hang timer, so that the first run does not spend that timer compiling."""
    code = "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
    done = subprocess.run([sys.executable, "-c", code], env=engine_env({"DS_ACCELERATOR": "cpu"}), capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]


def test_deepspeed_zero2_checkpoint_resume_and_ema_match_one_process(tmp_path, shm_comm_op_built):
    out, one = tmp_path / "deepspeed", tmp_path / "one"
    common = ("--checkpointing_steps", "1", "--use_ema")
    two_process_run(out, DEEPSPEED_ENV, "--max_train_steps", "1", *common)
    # ZeRO-2: each process saved its partition of the optimizer state
    assert sorted(p.name for p in (out / "checkpoint-1" / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    two_process_run(out, DEEPSPEED_ENV, "--max_train_steps", "2", *common, "--resume_from_checkpoint", "latest")
    one_run(one, "--max_train_steps", "2", *common)
    for step in (1, 2):  # the trained LoRA (clipped to --max_grad_norm by the engine, as on 1 process)
        for name in (ADAPTER, "trainable_params.safetensors"):
            assert max_diff(out / f"checkpoint-{step}" / name, one / f"checkpoint-{step}" / name) <= 1e-5
    assert max_diff(out / ADAPTER, one / ADAPTER) <= 1e-5  # the EMA weights, resumed from the EMA state of update 1
    assert max_diff(out / "checkpoint-2" / ADAPTER, out / "checkpoint-1" / ADAPTER) > 1e-4  # it trained


def test_configure_deepspeed_sets_the_engine_and_names_an_old_deepspeed(monkeypatch):
    from types import SimpleNamespace

    from deepspeed.runtime import constants

    from diffusers_am.training.engines import configure_deepspeed

    config = {"gradient_accumulation_steps": 4, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))
    configure_deepspeed(accelerator, micro_batch=3, max_grad_norm=10.0)
    assert config == {"gradient_accumulation_steps": 1, "gradient_clipping": 10.0, "zero_optimization": {"stage": 2},
                      "train_micro_batch_size_per_gpu": 3, "managed_gradient_accumulation": False}
    monkeypatch.delattr(constants, "MANAGED_GRADIENT_ACCUMULATION")
    old = r"cannot leave the gradient accumulation boundary .* `pip install -U deepspeed`"
    with pytest.raises(ValueError, match=old):
        configure_deepspeed(accelerator, micro_batch=3, max_grad_norm=10.0)
