"""The built wheel, installed outside the repository, trains and evaluates on its own package data.

The wheel is built offline from the installed setuptools (``pip wheel --no-build-isolation --no-deps``) out
of a copy of the sources (the build writes ``build/`` and ``*.egg-info`` beside them, never into the
repository), installed with ``pip install --no-deps --target``, and run from a temporary working folder with
only the install folder on ``PYTHONPATH``.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"diffusers-am-train": "diffusers_am.train:main", "diffusers-am-evaluate": "diffusers_am.evaluate:main",
               "diffusers-am-launch": "diffusers_am.launch:main"}
PACKAGE_DATA = (
    "diffusers_am/training/model_card_template.md",
    "diffusers_am/assets/digits-sit/model_index.json",
    "diffusers_am/assets/digits-sit/transformer/diffusion_pytorch_model.safetensors",
    "diffusers_am/assets/digits-classifier/model.safetensors",
    "diffusers_am/assets/digits-heldout-classifier/model.safetensors",
    "diffusers_am/assets/shapes-klein/model_index.json",
    "diffusers_am/assets/shapes-klein/diffusers_am_defaults.json",
    "diffusers_am/assets/shapes-klein/prompts_train.txt",
    "diffusers_am/assets/shapes-klein/transformer/diffusion_pytorch_model.safetensors",
    "diffusers_am/assets/shapes-klein/vae/diffusion_pytorch_model.safetensors",
    "diffusers_am/assets/shapes-klein/text_encoder/model.safetensors",
    "diffusers_am/assets/shapes-klein/tokenizer/tokenizer_config.json",
    "diffusers_am/assets/shapes-classifier/model.safetensors",
    "diffusers_am/assets/shapes-heldout-classifier/model.safetensors",
)
# The default job, cut to 2 updates and a 16-sample reward before / after.
TRAIN_ARGS = ("--max_train_steps", "2", "--num_eval_samples", "16", "--report_to", "none")


def _start(cmd, *, cwd, env):
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait(proc, what) -> str:
    """The process's stdout once it exits with status 0 (its output in the failure message otherwise)."""
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}"
    return out


def _run(cmd, *, cwd, env, what) -> str:
    return _wait(_start(cmd, cwd=cwd, env=env), what)


def _assert_run_outputs(out: Path):
    assert (out / "pytorch_lora_weights.safetensors").stat().st_size > 0
    card = (out / "README.md").read_text()
    assert "pipe.load_lora_weights" in card and "{{" not in card  # rendered from the packaged template
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]


def test_top_level_model_card_template_is_the_packaged_one():
    from diffusers_am.training.outputs import TEMPLATE

    assert TEMPLATE.parent == ROOT / "diffusers_am" / "training"
    assert (ROOT / "model_card_template.md").is_symlink()
    assert (ROOT / "model_card_template.md").resolve() == TEMPLATE.resolve()


@pytest.mark.skipif(not (ROOT / "diffusers_am" / "assets" / "digits-sit").is_dir(), reason="no embedded base here")
def test_wheel_installed_outside_the_repo_trains_and_evaluates(tmp_path):
    src, dist, site, work = (tmp_path / name for name in ("src", "dist", "site", "work"))
    src.mkdir()
    work.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "diffusers_am", src / "diffusers_am", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-build-isolation", "--no-deps", "--no-index", "--no-cache-dir", "-w", dist, src],
         cwd=tmp_path, env=os.environ, what="pip wheel")
    (wheel,) = dist.glob("diffusers_am-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert set(PACKAGE_DATA) <= names
    assert not any(n.startswith(("tests/", "examples/", "scripts/")) for n in names)
    for script, target in ENTRY_POINTS.items():
        assert f"{script} = {target}" in entry_points
    _run([*pip, "install", "--no-deps", "--no-index", "--no-cache-dir", "--target", site, wheel],
         cwd=tmp_path, env=os.environ, what="pip install --target")

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    probe = (
        "import json, sys, importlib.metadata as md, diffusers_am\n"
        "dist = md.distribution('diffusers-am')\n"
        "eps = {ep.name: callable(ep.load()) for ep in dist.entry_points if ep.group == 'console_scripts'}\n"
        "print(json.dumps({'file': diffusers_am.__file__, 'path': sys.path, 'eps': eps,"
        " 'dist': str(dist.locate_file(''))}))"
    )
    seen = json.loads(_run([sys.executable, "-c", probe], cwd=work, env=env, what="import probe"))
    assert Path(seen["file"]).resolve().is_relative_to(site.resolve())
    assert Path(seen["dist"]).resolve() == site.resolve()
    assert seen["eps"] == {name: True for name in ENTRY_POINTS}
    assert not [p for p in seen["path"] if p and Path(p).resolve() == ROOT]  # the sources are not importable

    # the two entry points side by side (each is one process, mostly imports): python -m diffusers_am.train writes
    # to the default output folder, relative to the working folder; the console script pip generated (a --target
    # install leaves it in <site>/bin) runs with this interpreter
    script = site / "bin" / "diffusers-am-train"
    runs = {
        "python -m diffusers_am.train": _start([sys.executable, "-m", "diffusers_am.train", *TRAIN_ARGS], cwd=work, env=env),
        script.name: _start([sys.executable, script, *TRAIN_ARGS, "--output_dir", "script-run"], cwd=work, env=env),
    }
    try:
        for what, proc in runs.items():
            _wait(proc, what)
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    _assert_run_outputs(work / "outputs" / "digits-sit-ode-am")
    _assert_run_outputs(work / "script-run")
    # evaluation of the first run's adapter against the base, on the packaged digits rewards and features
    _run([sys.executable, "-m", "diffusers_am.evaluate", "--adapters", "outputs/digits-sit-ode-am", "--prompts", "0",
          "1", "--num_images_per_prompt", "3", "--k", "2", "--output_dir", "eval"],
         cwd=work, env=env, what="python -m diffusers_am.evaluate")
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert Path(metrics["config"]["pipeline"]).resolve().is_relative_to(site.resolve())  # the packaged base
    assert set(metrics["models"]) == {"base", "digits-sit-ode-am"}
    assert all(math.isfinite(m["reward/digits-heldout"]) for m in metrics["models"].values())
