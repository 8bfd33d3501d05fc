"""Test-only: run train_adjoint_matching.py under accelerate's FSDP or DeepSpeed on CPU processes (gloo).

accelerate only builds FSDP for accelerator devices (on CPU it falls back to DDP), so this shim makes its
state see a multi-GPU job whose device is the CPU, with a gloo process group. Launch with
``python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp_cpu_launch.py <trainer flags>`` and the
ACCELERATE_USE_FSDP / FSDP_* variables set (tests/test_fsdp_cpu.py), or ACCELERATE_USE_DEEPSPEED /
ACCELERATE_DEEPSPEED_ZERO_STAGE and DS_ACCELERATOR=cpu (tests/test_deepspeed_cpu.py).
``FSDP_CPU_DUMP_AFTER=<seconds>`` prints every stack and exits after that long (a hang shows where each rank waits).
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _backend(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_GPU


def _set_device(self):
    self.device = torch.device("cpu")


if __name__ == "__main__":
    if os.environ.get("FSDP_CPU_DUMP_AFTER"):  # debugging a hang: print every stack, then exit
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["FSDP_CPU_DUMP_AFTER"]), exit=True)
    dist.init_process_group("gloo")
    PartialState._prepare_backend = _backend
    PartialState.set_device = _set_device
    import train_adjoint_matching as script

    code = script.main(sys.argv[1:])
    dist.destroy_process_group()
    sys.exit(code)
