"""Fine-tune a flow-matching pipeline toward a reward with truncated adjoint matching.

    accelerate launch train_adjoint_matching.py            # the default: ODE-AM on the embedded digits base
    python -m diffusers_am.train --config examples/digits_default.yaml --max_train_steps 100
    accelerate launch -m diffusers_am.train ...            # or the console script: diffusers-am-train ...

Every flag is a field of ``diffusers_am.training.TrainingConfig`` (``--help`` lists them); ``--config``
takes a YAML or JSON file of the same names. Writes a diffusers LoRA adapter
(``pytorch_lora_weights.safetensors``), validation grids, a model card and ``train_log.jsonl``
into ``--output_dir``.

Exit codes (the README's table, :mod:`diffusers_am.errors`): 0 done; 2 a bad input (a
:class:`~diffusers_am.errors.UserError`: one ``error: ...`` line, nothing written); 3 every update was skipped as
NaN / inf (one line, no adapter); 130 / 143 stopped by SIGINT / SIGTERM after writing a checkpoint (one line says
how to resume); 1 an output could not be written (a full disk: one line names the last good checkpoint), or a bug
(any other exception: its traceback, then a line saying where to report it). ``accelerate launch`` turns any
failure into 1; ``diffusers-am-launch`` keeps these codes.
"""

from __future__ import annotations

import sys
import traceback
from typing import Sequence


def _prints_errors() -> bool:
    from diffusers_am.training.console import prints_here

    return prints_here()


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: parse (no torch imported: ``--help`` is quick), train, print where the outputs are;
    returns the exit code. bitsandbytes stays unimported unless the run uses it (:mod:`diffusers_am.bnb`)."""
    from diffusers_am.errors import UserError

    try:
        from diffusers_am.bnb import bitsandbytes_deferred, run_needs_bitsandbytes
        from diffusers_am.errors import MainProcessError, RunStopped
        from diffusers_am.training.config import parse_args

        config = parse_args(argv)
        with bitsandbytes_deferred(not run_needs_bitsandbytes(config)):  # before diffusers and peft are imported
            from diffusers_am.training.trainer import AdjointMatchingTrainer

            trainer = AdjointMatchingTrainer(config)
            result = trainer.train()
    except KeyboardInterrupt:  # before the trainer's handlers are installed (imports, parsing)
        if _prints_errors():
            print("error: interrupted before training started; nothing was written.", file=sys.stderr)
        return 130
    except RunStopped as stop:
        if _prints_errors():
            print(f"{'' if stop.exit_code >= 128 else 'error: '}{stop}", file=sys.stderr)
        return stop.exit_code
    except UserError as err:  # a bad input: one line (a MainProcessError was printed by the main process)
        if _prints_errors() and not isinstance(err, MainProcessError):
            print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception:  # a bug, ours or a library's: its traceback, and where to report it
        from diffusers_am.errors import BUG_LINE

        traceback.print_exc()
        if _prints_errors():
            print(BUG_LINE, file=sys.stderr)
        return 1
    if trainer.accelerator.is_main_process:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        print(
            f"\nreward before: {fmt(result.reward_before)}  after: {fmt(result.reward_after)}  "
            f"({result.steps} updates, {fmt(result.seconds_per_update)} s/update, {result.skipped_updates} skipped)\n"
            f"adapter: {result.adapter_path}\n"
            f"compare: {result.output_dir / 'comparison.png'} (base | fine-tuned, same noise and prompts)\n"
            f"grids:   {result.grid_path} (fine-tuned), "
            f"{result.output_dir / 'validation' / 'base.png'} (base, same noise), "
            f"{result.output_dir / 'validation'}\n"
            f"card:    {result.card_path}\n"
            f"log:     {result.log_path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
