"""``diffusers-am-launch``: ``accelerate launch`` that keeps the trainer's exit code and one-line errors.

    diffusers-am-launch train_adjoint_matching.py --reward nonexistent      # one error line, exit 2
    python -m diffusers_am.launch --num_processes 2 train_adjoint_matching.py ...

It takes exactly ``accelerate launch``'s arguments and runs accelerate's own launcher. The difference: when
the training script fails, ``accelerate launch`` exits 1 whatever the script's exit code, and (without
``--quiet``) prints the script's stderr a second time inside a RuntimeError and a CalledProcessError
traceback; here the script's own exit code is returned (the README's table: 2 a bad input, 3 nothing
trained, 130 / 143 a signal, ...) and nothing is added to the script's own output.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Sequence


def _child_exit_code(error: BaseException) -> int | None:
    """The failed script's exit code from accelerate's launcher exception, or None if it carries none."""
    if isinstance(error, subprocess.CalledProcessError):
        return error.returncode
    failures = getattr(error, "failures", None)  # torch.distributed.elastic's ChildFailedError (several processes)
    if isinstance(failures, dict):
        codes = [getattr(f, "exitcode", None) for _, f in sorted(failures.items())]
        codes = [c for c in codes if isinstance(c, int) and c != 0]
        if codes:
            return codes[0] if codes[0] > 0 else 128 - codes[0]  # a negative exitcode is a signal number
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``accelerate launch`` arguments, launch, and return the script's exit code (0 when it succeeded)."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except Exception as error:  # accelerate's report of a failed script: the script already printed its line
        code = _child_exit_code(error)
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
