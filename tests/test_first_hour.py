"""A new user's first hour: no third-party noise on the default run, a quick ``--help``, output files
readable as the umask says, labelled grids with a base-vs-fine-tuned comparison, a default output folder
named after the model, and informational lines that do not break the progress bar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _run_helpers import tiny_args, tiny_base  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "peft", "accelerate", "transformers", "bitsandbytes")


def python(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from the repository root (offline), tests/ importable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


# -- --help without torch --------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["diffusers_am.train", "train_adjoint_matching"])
def test_help_imports_no_torch(entry):
    proc = python(f"""
        import sys
        from {entry} import main
        try:
            main(["--help"])
        except SystemExit as stop:
            assert stop.code == 0, stop.code
        print("LOADED", [m for m in {HEAVY!r} if m in sys.modules])
    """)
    assert proc.returncode == 0, proc.stderr
    assert "--pretrained_model_name_or_path" in proc.stdout and "FLUX.2-klein" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []"


def test_bad_method_is_one_line_without_the_registry_in_argparse(capsys):
    from diffusers_am.train import main

    assert main(["--method", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: `--method` must be one of ode-am, sde-am, draft, refl; got 'nope'."


# -- bitsandbytes only when asked for -------------------------------------------------------------------
def _bnb_installed() -> bool:
    import importlib.util

    from diffusers_am.bnb import is_deferred

    return not is_deferred() and importlib.util.find_spec("bitsandbytes") is not None


needs_bnb = pytest.mark.skipif(not _bnb_installed(), reason="bitsandbytes is not installed")


@needs_bnb
def test_default_run_never_imports_bitsandbytes(tiny_base, tmp_path):  # noqa: F811
    proc = python(f"""
        import sys
        from diffusers_am.train import main
        from _run_helpers import tiny_args
        assert main(tiny_args({str(tiny_base)!r}, {str(tmp_path / 'out')!r}, "--max_train_steps", "1")) == 0
        print("BNB", "bitsandbytes" in sys.modules, "diffusers" in sys.modules, "peft" in sys.modules)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "BNB False True True"  # the block was lifted afterwards
    assert "trust" not in proc.stderr and "bitsandbytes" not in proc.stderr


@needs_bnb
def test_use_8bit_adam_imports_bitsandbytes(tiny_base, tmp_path):  # noqa: F811
    proc = python(f"""
        import sys
        from diffusers_am.train import main
        from _run_helpers import tiny_args
        out = {str(tmp_path / 'out')!r}
        assert main(tiny_args({str(tiny_base)!r}, out, "--max_train_steps", "1", "--use_8bit_adam")) == 0
        print("BNB", type(sys.modules.get("bitsandbytes")).__name__)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "BNB module"


@needs_bnb
def test_evaluate_cli_never_imports_bitsandbytes(tmp_path):
    proc = python(f"""
        import sys
        from diffusers_am.evaluate import main
        assert main(["--prompts", "1", "7", "--num_images_per_prompt", "2", "--num_inference_steps", "2",
                     "--output_dir", {str(tmp_path / 'eval')!r}]) == 0
        print("BNB", "bitsandbytes" in sys.modules, "diffusers" in sys.modules)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "BNB False True"


@needs_bnb
def test_import_bitsandbytes_after_the_block_tells_diffusers_and_peft():
    proc = python("""
        from diffusers_am.bnb import defer_bitsandbytes, import_bitsandbytes
        assert defer_bitsandbytes()
        import diffusers.models.modeling_utils  # noqa: F401  (its quantizers look for bitsandbytes)
        from diffusers.utils import is_bitsandbytes_available
        from peft.import_utils import is_bnb_4bit_available, is_bnb_available
        from transformers.utils import import_utils as tf
        before = (is_bitsandbytes_available(), is_bnb_available(), tf.is_bitsandbytes_available())
        bnb = import_bitsandbytes("--use_8bit_adam")
        from diffusers.quantizers.bitsandbytes import utils
        after = (is_bitsandbytes_available(), is_bnb_available(), is_bnb_4bit_available(), tf.is_bitsandbytes_available())
        print("FLAGS", before, after, utils.bnb is bnb)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "FLAGS (False, False, False) (True, True, True, True) True"


def test_quantized_pipeline_folder_needs_bitsandbytes(tmp_path):
    from diffusers_am.bnb import pipeline_needs_bitsandbytes, run_needs_bitsandbytes
    from diffusers_am.training.config import TrainingConfig

    (tmp_path / "transformer").mkdir()
    config = tmp_path / "transformer" / "config.json"
    config.write_text(json.dumps({"_class_name": "X"}))
    assert not pipeline_needs_bitsandbytes(tmp_path)
    config.write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}))
    assert pipeline_needs_bitsandbytes(tmp_path) and pipeline_needs_bitsandbytes(str(tmp_path))
    assert not pipeline_needs_bitsandbytes("black-forest-labs/FLUX.2-klein-4B") and not pipeline_needs_bitsandbytes(None)
    assert run_needs_bitsandbytes(TrainingConfig(use_8bit_adam=True))
    assert run_needs_bitsandbytes(TrainingConfig(quantize_base="nf4"))
    assert not run_needs_bitsandbytes(TrainingConfig())


# -- file modes follow the umask ---------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_output_file_has_the_umask_mode(tiny_base, tmp_path, umask):  # noqa: F811
    from diffusers_am.train import main

    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        assert main(tiny_args(tiny_base, out, "--checkpointing_steps", "1")) == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()}
    assert "pytorch_lora_weights.safetensors" in modes and "checkpoint-2/pytorch_lora_weights.safetensors" in modes
    assert {name for name, mode in modes.items() if mode != oct(0o666 & ~umask)} == set(), modes


# -- the default output folder is named after the model ---------------------------------------------------
def test_default_output_dir_is_named_after_the_model_and_method(tmp_path, monkeypatch):
    from diffusers_am.training.config import TrainingConfig, parse_args

    monkeypatch.chdir(tmp_path)
    assert TrainingConfig().output_dir == os.path.join("outputs", "digits-sit-ode-am")
    assert parse_args(["--method", "draft"]).output_dir == os.path.join("outputs", "digits-sit-draft")
    klein = parse_args(["--pretrained", "FLUX.2-klein", "--truncate_steps", "1"])
    assert klein.output_dir == os.path.join("outputs", "FLUX.2-klein-4B-ode-am")
    (tmp_path / "pipes" / "my pipe").mkdir(parents=True)
    assert TrainingConfig(pretrained_model_name_or_path="pipes/my pipe/").output_dir == os.path.join(
        "outputs", "my-pipe-ode-am"
    )
    assert parse_args(["--output_dir", "elsewhere"]).output_dir == "elsewhere"


def test_flux_command_without_output_dir_names_the_model_not_the_digits_folder(
    tiny_base, tmp_path, monkeypatch, capsys  # noqa: F811
):
    """The README's FLUX.2-klein command after `make train`, offline: the model that cannot be downloaded is
    named, never the default folder of the digits run (nor any folder problem)."""
    from huggingface_hub import constants

    from diffusers_am.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = tiny_args(tiny_base, "unused")
    digits = args[args.index("--num_inference_steps"):]  # the tiny run's flags, default --output_dir
    assert main(["--pretrained", str(tiny_base), *digits]) == 0
    made = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert made == [Path(tiny_base).name + "-ode-am"]
    capsys.readouterr()
    flux_default = tmp_path / "outputs" / "FLUX.2-klein-4B-ode-am"  # a folder problem there comes second
    flux_default.mkdir()
    (flux_default / "mine.txt").write_text("not a run")
    assert main(["--pretrained", "FLUX.2-klein", "--truncate_steps", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "'black-forest-labs/FLUX.2-klein-4B'" in err[0] and "hf download" in err[0], err
    assert (flux_default / "mine.txt").read_text() == "not a run"


# -- prints during the updates go above the progress bar ------------------------------------------------
class PrintingCallback:
    def on_update_end(self, trainer, step, record):
        print(f"CALLBACK step {step}", "reward", "seen")
        print("partial line, ", end="")
        print("completed")
        sys.stderr.write("to stderr\n")


def test_callback_prints_do_not_break_the_progress_bar(tiny_base, tmp_path, monkeypatch):  # noqa: F811
    import io

    from diffusers_am.training import AdjointMatchingTrainer
    from diffusers_am.training.config import parse_args

    screen = io.StringIO()  # stdout and stderr interleaved, as a terminal shows them
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    config = parse_args(tiny_args(tiny_base, tmp_path / "out", "--max_train_steps", "3"))
    AdjointMatchingTrainer(config, callbacks=[PrintingCallback()]).train()
    assert sys.stdout is screen and sys.stderr is screen  # restored
    shown = [line.split("\r")[-1] for line in screen.getvalue().split("\n")]  # what stays visible per line
    for step in (1, 2, 3):
        assert shown.count(f"CALLBACK step {step} reward seen") == 1, screen.getvalue()
    assert shown.count("partial line, completed") == 3 and shown.count("to stderr") == 3
    assert any("updates: 100%" in line and "3/3" in line for line in shown)  # the bar itself is still drawn


# -- labelled grids and the base | fine-tuned comparison ---------------------------------------------------
def _dark(array) -> bool:
    return bool((array < 128).any())


def test_grid_rows_carry_their_labels_and_a_title():
    import numpy as np

    from diffusers_am.metrics.grid import comparison_grid, image_grid

    white = __import__("torch").ones(4, 1, 8, 8)  # white tiles: every dark pixel is text
    plain = np.asarray(image_grid(white, nrow=2))
    assert not _dark(plain)  # no labels asked for: no text, the layout of before
    grid = np.asarray(image_grid(white, nrow=2, row_labels=[1, 7], title="fine-tuned, update 3").convert("L"))
    assert grid.shape[0] > plain.shape[0] and grid.shape[1] > plain.shape[1]  # a title band, a label column
    top = grid.shape[0] - plain.shape[0]
    label_cols = grid[top:, : grid.shape[1] - plain.shape[1]]
    half = label_cols.shape[0] // 2
    assert _dark(grid[:top]) and _dark(label_cols[:half]) and _dark(label_cols[half:])
    assert not np.array_equal(label_cols[:half], label_cols[half : 2 * half])  # "class 1" is not "class 7"
    assert not _dark(grid[top:, grid.shape[1] - plain.shape[1]:])  # the tiles are untouched
    both = np.asarray(comparison_grid({"base model": white, "fine-tuned": white}, 2, row_labels=["a cat", "a dog"]))
    assert both.shape[0] == grid.shape[0] and both.shape[1] > 2 * plain.shape[1]
    with pytest.raises(ValueError, match="row_labels"):
        image_grid(white, nrow=2, row_labels=[1, 2, 3])
    with pytest.raises(ValueError, match="same shape"):
        comparison_grid({"a": white, "b": white[:2]}, 2)


def test_run_writes_a_labelled_base_vs_fine_tuned_comparison(tiny_base, tmp_path):  # noqa: F811
    import numpy as np
    from PIL import Image

    from diffusers_am.train import main

    out = tmp_path / "out"
    assert main(tiny_args(tiny_base, out)) == 0
    base, final, both = (np.asarray(Image.open(out / name).convert("L"))
                         for name in ("validation/base.png", "validation/final.png", "comparison.png"))
    assert base.shape == final.shape and both.shape[0] == base.shape[0] and both.shape[1] > base.shape[1]
    width = base.shape[1]
    # the left panel is base.png's grid (labels, title, tiles), the right one final.png's, on the same noise
    assert np.array_equal(both[:, :width], base)
    assert np.array_equal(both[:, -100:], final[:, -100:])
    assert not np.array_equal(base[:, -100:], final[:, -100:])  # titles (and the trained tiles) differ
    assert "comparison.png" in json.loads((out / ".diffusers-am-run.json").read_text())["entries"]  # the run's own


# -- the README's held-out figures come from a documented command ------------------------------------------
def test_heldout_accuracy_metric_is_the_argmax_agreement():
    import torch

    from diffusers_am.rewards import load_reward

    accuracy = load_reward("digits-heldout-accuracy")
    heldout = load_reward("digits-heldout")
    images = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = [i % 10 for i in range(12)]
    with torch.no_grad():  # reference: the label whose log-probability is highest, one label at a time
        per_label = torch.stack([heldout(images, [c] * 12) for c in range(10)], dim=1)
        expected = (per_label.argmax(dim=1) == torch.tensor(labels)).float()
        assert torch.equal(accuracy(images, labels), expected)


def test_readme_heldout_command_is_documented_with_its_numbers():
    readme = (REPO / "README.md").read_text()
    command = ("python -m diffusers_am.evaluate --adapters outputs/digits-sit-ode-am --num_images_per_prompt 20 \\\n"
               "    --rewards digits digits-heldout digits-heldout-accuracy --output_dir outputs/digits-sit-ode-am-eval")
    assert command in readme
    assert "| digits-sit-ode-am | -0.04303 ± 0.0044 | -0.04787 ± 0.0049 | 0.995 ± 0.005 |" in readme
    assert "-0.094 -> -0.044, accuracy 97.5% -> 100% on 200 samples" not in readme
