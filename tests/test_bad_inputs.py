"""Nothing silently wrong: every bad input of issue 17B is one line (naming the argument, file or line and
what is accepted) with the README's exit code, before anything is sampled or written.

Reward weights, ``--reg_order`` close to 1 (stable phi_p, matched lambda, a run whose every update is
skipped), duplicate keys in ``--config`` files, errors in the user's reward code, damaged adapter files and
a foreign ``--output_dir`` for evaluate, prompt lines, and the exit code under ``accelerate launch``."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _run_helpers import _fresh_accelerate_state, read_log, run, tiny_base  # noqa: F401  (fixtures)

import train_adjoint_matching as script
from diffusers_am.training.config import parse_args

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(captured) -> str:
    """The single ``error: ...`` line of stderr (progress bars left out); fails on more lines or a traceback."""
    lines = [x for x in captured.err.replace("\r", "\n").splitlines() if x.strip() and "it/s" not in x]
    lines = [x for x in lines if not x.startswith("[RANK")]  # the trainer's own warnings while running
    assert "Traceback" not in captured.err, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


# -- 1. reward weights -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, words",
    [
        ("digits:2.0,digits:-1", ["names 'digits' twice", "digits:1"]),
        ("digits:nan", ["weight of 'digits' is 'nan'", "finite non-zero"]),
        ("digits:inf", ["weight of 'digits' is 'inf'", "finite non-zero"]),
        ("digits:1,digits-heldout:0", ["weight of 'digits-heldout' is '0'", "finite non-zero"]),
    ],
)
def test_reward_weights_refused_with_one_line(tmp_path, capsys, spec, words):
    out = tmp_path / "run"
    assert script.main(["--reward", spec, "--output_dir", str(out)]) == 2
    line = one_error_line(capsys.readouterr())
    assert "`--reward`" in line and all(w in line for w in words), line
    assert not out.exists()


def test_negative_weight_is_a_documented_choice():
    from diffusers_am.rewards import _parse_weighted

    assert _parse_weighted("digits:1.0,digits-heldout:-0.5") == {"digits": 1.0, "digits-heldout": -0.5}


# -- 2. --reg_order close to 1 ----------------------------------------------------------------------
def test_optimal_control_has_no_intermediate_overflow():
    """phi_p(a) = -|a|^(1/(p-1)) a/|a|: for p = 100 and |a| = 1.7e-40 the result is ~0.4, although
    |a|^((2-p)/(p-1)) alone is ~1e39, beyond float32. Reference in Python floats, per sample."""
    from diffusers_am.control import optimal_control

    a = torch.tensor([[1e-40, -2e-40, 0.0], [3.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    for p in (100.0, 1.05, 4.0):
        u = optimal_control(a, p)
        for row, got in zip(a.tolist(), u.tolist()):
            norm = math.sqrt(sum(x * x for x in row))
            want = [0.0 if norm == 0 else -(norm ** (1 / (p - 1))) * x / norm for x in row]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-30), (p, row, got, want)


def test_matched_lambda_for_an_order_close_to_one():
    """At p = 1.01 the control at lambda = 1 (|a|^100, |a| in [2, 6]) overflows float32; the matched lambda
    must still solve median_b size_b(lambda) = the 2nd-order size. Reference: log-space Python floats."""
    from diffusers_am.calibration import matched_reward_scale
    from diffusers_am.probe import ControlProfile

    n, p = 4, 1.01
    gen = torch.Generator().manual_seed(0)
    norms = 2.0 + 4.0 * torch.rand(n, 5, generator=gen)
    times = torch.linspace(0.0, 1.0, n + 1)
    prof = ControlProfile(times=times, step_index=torch.arange(n), num_steps=n, adjoint_norms=norms,
                          reward_scale=1.0, order=p)
    lam = matched_reward_scale(prof.with_order(2.0), prof, reference_scale=10.0, truncate_steps=n)

    dt = [float(times[k + 1] - times[k]) for k in range(n)]
    q = 1.0 / (p - 1.0)

    def log_size(column: list[float], power: float, scale: float) -> float:
        terms = [math.log(d) + 2 * power * math.log(scale * a) for d, a in zip(dt, column)]
        top = max(terms)
        return 0.5 * (top + math.log(sum(math.exp(t - top) for t in terms)) - math.log(sum(dt)))

    columns = [[float(norms[k, b]) for k in range(n)] for b in range(norms.shape[1])]
    ref = sorted(log_size(c, 1.0, 10.0) for c in columns)[2]  # median of 5 samples, 2nd order at lambda 10
    unit = sorted(log_size(c, q, 1.0) for c in columns)[2]
    want = math.exp((ref - unit) / q)
    assert lam == pytest.approx(want, rel=1e-6) and lam > 0


def test_order_close_to_one_with_matched_lambda_trains(tiny_base, tmp_path, capsys):
    """--reg_order 1.01 --match_reward_scale velocity on the tiny base: a finite lambda and updates that
    change the adapter (before: lambda = 0, loss 0, an untrained adapter and exit 0)."""
    out = tmp_path / "run"
    assert run(tiny_base, out, "--reg_order", "1.01", "--match_reward_scale", "velocity",
               "--match_probe_batches", "1") == 0
    printed = capsys.readouterr().out
    assert "lambda = 0 " not in printed
    log = read_log(out)
    assert not any(r["skipped"] for r in log) and all(r["loss"] > 0 for r in log)


def test_every_update_skipped_is_exit_3_with_one_line(tiny_base, tmp_path, capsys):
    """--reg_order 1.01 at lambda 10: the control |a|^100 overflows float32 in every update. The run says so
    in one line naming --reg_order and exits 3; no adapter is written."""
    out = tmp_path / "run"
    assert run(tiny_base, out, "--reg_order", "1.01") == 3
    line = one_error_line(capsys.readouterr())
    assert "all 2 updates were skipped" in line and "--reg_order 1.01" in line and "no adapter" in line
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert all(r["skipped"] for r in read_log(out))


# -- 3. duplicate keys in --config files -------------------------------------------------------------
@pytest.mark.parametrize(
    "name, text, words",
    [
        ("c.yaml", "learning_rate: 1e-3\nseed: 1\nlearning_rate: 2e-3\n", ["line 3", "'learning_rate' is set twice"]),
        ("c.json", '{"seed": 1, "seed": 2}', ["'seed' is set twice"]),
        ("c.yaml", "learning-rate: 1e-3\nlearning_rate: 2e-3\n", ["'learning-rate' and 'learning_rate'"]),
    ],
)
def test_duplicate_config_keys_refused(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        parse_args(["--config", str(path)])
    message = str(info.value)
    assert str(path) in message and all(w in message for w in words) and "\n" not in message, message


# -- 4. the user's reward code at set-up -------------------------------------------------------------
@pytest.mark.parametrize(
    "source, words",
    [
        ("def reward(images, prompts)\n    return images.mean((1, 2, 3))\n", ["line 1", "syntax error"]),
        ("raise RuntimeError('no weights here')\n\ndef reward(images, prompts):\n    return images\n",
         ["RuntimeError: no weights here", "line 1"]),
        ("def reward(images, prompts):\n    images.mul_(0.5)\n    return images.mean((1, 2, 3))\n",
         ["in place", "line 2"]),
        ("def reward(images, prompts):\n    images.data.mul_(0.5)\n    return images.mean((1, 2, 3))\n",
         ["in place"]),
        ("def reward(images, prompts):\n    return images.mean((1, 2, 3)).to('meta')\n", ["on meta", "images' device"]),
    ],
    ids=["syntax", "raises-on-import", "in-place", "in-place-data", "other-device"],
)
def test_user_reward_errors_are_one_line(tiny_base, tmp_path, capsys, source, words):
    path = tmp_path / "my_reward.py"
    path.write_text(source)
    out = tmp_path / "run"
    assert run(tiny_base, out, "--reward", f"{path}:reward") == 2
    line = one_error_line(capsys.readouterr())
    assert all(w in line for w in words), line
    assert not out.exists()


# -- 5 and 7. evaluate: adapter files checked before sampling; its output folder protected ------------
@pytest.fixture(scope="module")
def sit_lora(tiny_base, tmp_path_factory):
    from diffusers_am.models import LoraSettings
    from diffusers_am.models.sit import SiTAdapter

    adapter = SiTAdapter.from_pretrained(str(tiny_base))
    adapter.add_lora(LoraSettings(rank=2))
    folder = tmp_path_factory.mktemp("lora")
    adapter.save_lora(str(folder))
    return folder / "pytorch_lora_weights.safetensors"


def _eval_args(base, out, *extra):
    return ["--pretrained_model_name_or_path", str(base), "--prompts", "3", "5", "--num_images_per_prompt", "3",
            "--rewards", "digits", "--feature_extractor", "digits", "--diversity", "ssim",
            "--num_inference_steps", "2", "--output_dir", str(out), *extra]


def test_evaluate_refuses_damaged_adapters_before_sampling(tiny_base, sit_lora, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    import diffusers_am.evaluate as ev

    state = load_file(str(sit_lora))
    key_a = next(k for k in state if k.endswith("lora_A.weight"))
    files = {}
    files["text"] = tmp_path / "text.safetensors"
    files["text"].write_text("this is not an adapter\n")
    files["truncated"] = tmp_path / "truncated.safetensors"
    files["truncated"].write_bytes(sit_lora.read_bytes()[:-64])
    files["shape"] = tmp_path / "shape.safetensors"
    save_file({**state, key_a: torch.zeros(state[key_a].shape[0], state[key_a].shape[1] + 3)}, str(files["shape"]))
    files["int"] = tmp_path / "int.safetensors"
    save_file({k: v.to(torch.int32) for k, v in state.items()}, str(files["int"]))
    files["names"] = tmp_path / "names.safetensors"
    save_file({"transformer.no_such_block.lora_A.weight": state[key_a],
               "transformer.no_such_block.lora_B.weight": state[key_a.replace("lora_A", "lora_B")]},
              str(files["names"]))
    words = {"text": "not a readable LoRA weight file", "truncated": "not a readable LoRA weight file",
             "shape": "has shapes lora_A", "int": "torch.int32", "names": "names no module"}
    sampled = []
    monkeypatch.setattr(ev.AdapterSampler, "sample", lambda *a, **k: sampled.append(1))
    out = tmp_path / "eval"
    for kind, path in files.items():
        assert ev.main(_eval_args(tiny_base, out, "--adapters", str(path))) == 2, kind
        line = one_error_line(capsys.readouterr())
        assert str(path) in line and words[kind] in line, (kind, line)
        assert not out.exists() and not sampled, kind


def test_evaluate_protects_its_output_folder(tiny_base, sit_lora, tmp_path, capsys):
    import diffusers_am.evaluate as ev
    from diffusers_am.training.layout import MARKER_NAME

    users = tmp_path / "mine"
    users.mkdir()
    (users / "metrics.md").write_text("my own notes\n")
    assert ev.main(_eval_args(tiny_base, users)) == 2
    line = one_error_line(capsys.readouterr())
    assert "`--output_dir`" in line and str(users) in line and "not empty" in line
    assert (users / "metrics.md").read_text() == "my own notes\n" and sorted(os.listdir(users)) == ["metrics.md"]

    out = tmp_path / "eval"
    assert ev.main(_eval_args(tiny_base, out)) == 0
    entries = json.loads((out / MARKER_NAME).read_text())["entries"]
    assert {"metrics.json", "metrics.md", "samples_base.png"} <= set(entries)
    assert set(os.listdir(out)) - {MARKER_NAME} <= set(entries)
    assert ev.main(_eval_args(tiny_base, out)) == 0  # a rerun into its own folder
    (out / "notes.txt").write_text("kept\n")  # a user's file beside a report stays
    assert ev.main(_eval_args(tiny_base, out)) == 0 and (out / "notes.txt").read_text() == "kept\n"


# -- 6. prompt lines --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, content, conditioning, words",
    [
        ("labels.txt", "1\n" + "7" * 1_000_000 + "\n", "class", ["line 2", "digits 0-9"]),
        ("labels.txt", "1\n\u0663\n", "class", ["line 2", "'\u0663'", "digits 0-9"]),
        ("labels.txt", "1\n2\n\u00b2\n", "class", ["line 3", "digits 0-9"]),
        ("prompts.txt", "a cat\n" + "a" * 1_000_000 + "\n", "text", ["line 2", "1000000 characters", "at most"]),
        ("prompts.csv", "prompt\na cat\n" + "b" * 200_000 + "\n", "text", ["line 3"]),
    ],
    ids=["huge-label", "arabic-digit", "superscript", "huge-prompt", "huge-csv-field"],
)
def test_prompt_lines_name_file_and_line(tmp_path, name, content, conditioning, words):
    from diffusers_am.prompts import load_prompts

    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_prompts(path, conditioning=conditioning)
    message = str(info.value)
    assert message.startswith(str(path)) and all(w in message for w in words), message[:300]
    assert len(message) < 400 and "\n" not in message


# -- 8. the exit code under accelerate launch -------------------------------------------------------
def test_exit_code_and_one_line_under_accelerate_launch(tmp_path):
    """`diffusers-am-launch` (accelerate's launcher, one CPU process) keeps the script's one line and exit 2;
    `accelerate launch` itself would exit 1 and add a CalledProcessError traceback."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "diffusers_am.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
         str(ROOT / "train_adjoint_matching.py"), "--reward", "nonexistent", "--output_dir", str(out)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert "Traceback" not in proc.stderr and lines == [lines[-1]], proc.stderr
    assert lines[-1].startswith("error: unknown reward 'nonexistent'")
    assert not out.exists()


# -- the user-error channel: only a UserError is one line ------------------------------------------
def test_a_bad_flag_is_one_line_and_exit_2(tiny_base, tmp_path, capsys):
    assert run(tiny_base, tmp_path / "out", "--learning_rate", "-1") == 2
    line = one_error_line(capsys.readouterr())
    assert line.startswith("error: `--learning_rate`") and "-1" in line
    assert not (tmp_path / "out").exists()


def test_a_value_error_inside_the_model_adapter_is_a_bug_with_its_traceback(tiny_base, tmp_path, capsys, monkeypatch):
    """A ValueError from deep inside (here the model adapter's decode, as diffusers or peft might raise) is not
    the user's mistake: its traceback is printed, then the line saying it is a bug and where to report it,
    exit 1; no one-line `error:` that would hide it."""
    from diffusers_am.errors import BUG_LINE
    from diffusers_am.models.sit import SiTAdapter

    def broken_decode(self, x):
        raise ValueError("operands could not be broadcast together (inside the model)")

    monkeypatch.setattr(SiTAdapter, "decode", broken_decode)
    assert run(tiny_base, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken_decode" in err
    assert "ValueError: operands could not be broadcast together (inside the model)" in err
    assert err.strip().splitlines()[-1] == BUG_LINE
    assert "error: operands" not in err


def test_user_error_is_a_value_error_and_the_only_one_line_error():
    from diffusers_am.errors import MainProcessError, UserError

    assert issubclass(UserError, ValueError) and issubclass(MainProcessError, UserError)
    with pytest.raises(UserError, match="`--learning_rate`"):
        parse_args(["--learning_rate", "nan"])
