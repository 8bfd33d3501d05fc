"""Gradient checkpointing changes memory, not results: the same adapter with and without
``--gradient_checkpointing`` for every method on the digits base and for ODE-AM on each FlowMatch
family, the base VJP with the LoRA off in forward and backward, and the README's FLUX command's
flags together on tiny FLUX.2-klein.

The measured differences are printed (``pytest -s tests/test_gradient_checkpointing.py``)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from _tiny_pipelines import TINY_RESOLUTION as RES
from _run_helpers import max_abs_difference
from _run_helpers import trained_adapter as train
from _tiny_pipelines import save_tiny_flux, save_tiny_flux2_klein, save_tiny_sd3
from _tiny_sit import tiny_pixel_pipeline
from _run_helpers import _fresh_accelerate_state  # noqa: F401  (fixture)

from diffusers_am.models import LoraSettings
from diffusers_am.models.sit import SiTAdapter
from diffusers_am.training.methods import method_names

TOL = 1e-5
TINY_REWARD = f"{Path(__file__).resolve().parent / '_tiny_pipelines.py'}:mean_brightness"
DIGITS = [  # the embedded digits base (the default model): N = 4, K = 2, batch 2, 2 updates
    "--num_inference_steps", "4", "--truncate_steps", "2", "--train_batch_size", "2", "--max_train_steps", "2",
    "--num_eval_samples", "0", "--num_validation_images", "1", "--validation_prompts", "3",
    "--validation_steps", "0", "--report_to", "none", "--rank", "2", "--cpu_threads", "1",
]
VALUES = ["--adam_epsilon", "1.0", "--learning_rate", "1.0"]
"""Adam's first steps are about lr * sign(g) at the default epsilon; with a large one the step is lr * g / (|g| +
eps), so the compared adapters differ where the gradients' values differ, not only their signs."""


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Counts torch.utils.checkpoint.checkpoint calls (diffusers' blocks call it when checkpointing is on)."""
    calls = {"n": 0}
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls




def report(label: str, difference: float) -> None:
    print(f"\ncheckpointed vs plain adapter, {label}: max abs difference {difference:.3g}")


# -- the protocol: one base VJP with the LoRA off in forward and backward -------------------------------
def _sit_flow(lora: bool, checkpointing: bool):
    adapter = SiTAdapter(tiny_pixel_pipeline())
    params = []
    if lora:
        params = adapter.add_lora(LoraSettings(rank=2, init_lora_weights=False))  # B != 0: the LoRA acts
    if checkpointing:
        adapter.transformer.enable_gradient_checkpointing()
    adapter.transformer.train()
    return adapter, params, adapter.flow(adapter.encode_conditions([1, 8]), guidance_scale=1.5)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "no-lora"])
def test_base_vjp_under_checkpointing_is_the_base_models(lora, checkpoint_calls):
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, cotangent = torch.tensor(0.6), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    _, _, plain = _sit_flow(lora=False, checkpointing=False)  # the same seeded base weights, no LoRA at all
    expected = plain.base_vjp(x, t, cotangent)
    adapter, params, flow = _sit_flow(lora=lora, checkpointing=True)
    value, jt = flow.base_vjp(x, t, cotangent)
    assert checkpoint_calls["n"] > 0  # the blocks were checkpointed (and recomputed in the backward)
    torch.testing.assert_close(value, expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(jt, expected[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(flow.base_velocity(x, t), expected[0], rtol=0, atol=1e-6)
    assert value.dtype == jt.dtype == torch.float32 and not value.requires_grad
    if lora:
        assert all(p.requires_grad for p in params)  # peft's disable switched them off; enable restored them
        assert not torch.allclose(flow.velocity(x, t), value)
        flow.velocity(x, t).square().sum().backward()  # the LoRA path still trains after the base VJP
        assert all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)


# -- trainer: checkpointed == plain ---------------------------------------------------------------------
@pytest.mark.parametrize("method", method_names())
def test_checkpointing_gives_the_plain_adapter_on_digits(method, tmp_path, checkpoint_calls):
    plain = train(tmp_path / "plain", "--method", method, *DIGITS, *VALUES)
    assert checkpoint_calls["n"] == 0
    checkpointed = train(tmp_path / "ckpt", "--method", method, "--gradient_checkpointing", *DIGITS, *VALUES)
    assert checkpoint_calls["n"] > 0
    difference = max_abs_difference(plain, checkpointed)
    report(f"digits base, {method}, fp32", difference)
    assert difference <= TOL


def test_checkpointing_with_lora_dropout_gives_the_plain_adapter(tmp_path, checkpoint_calls):
    """LoRA dropout draws random masks in the forward: a checkpointed block must recompute its backward with the
    same masks (the RNG state restored), else the gradient belongs to another dropout draw. A large Adam
    epsilon makes the update lr * g / (|g| + eps), so the adapters compare gradient values (VALUES)."""
    common = ["--method", "ode-am", *DIGITS, *VALUES]
    plain = train(tmp_path / "plain", "--lora_dropout", "0.5", *common)
    checkpointed = train(tmp_path / "ckpt", "--lora_dropout", "0.5", "--gradient_checkpointing", *common)
    assert checkpoint_calls["n"] > 0
    without_dropout = train(tmp_path / "no-dropout", *common)
    difference = max_abs_difference(plain, checkpointed)
    report("digits base, ode-am, LoRA dropout 0.5", difference)
    assert difference <= TOL
    # the dropout acts: the same run without it gives another adapter, by far more than TOL
    assert max_abs_difference(plain, without_dropout) > 100 * TOL


@pytest.mark.parametrize("method", method_names())
def test_checkpointing_bf16_and_ema_together_on_digits(method, tmp_path, checkpoint_calls):
    """Each method with checkpointing + bf16 mixed precision + EMA: same EMA adapter as without checkpointing."""
    common = ["--method", method, "--mixed_precision", "bf16", "--use_ema", "--ema_decay", "0.5", *DIGITS, *VALUES]
    plain = train(tmp_path / "plain", *common)
    checkpointed = train(tmp_path / "ckpt", "--gradient_checkpointing", *common)
    assert checkpoint_calls["n"] > 0
    config = json.loads((tmp_path / "ckpt" / "training_config.json").read_text())
    assert config["mixed_precision"] == "bf16" and config["use_ema"] and config["gradient_checkpointing"]
    difference = max_abs_difference(plain, checkpointed)
    report(f"digits base, {method}, bf16 + EMA", difference)
    assert difference <= TOL


FAMILIES = {"flux2-klein": save_tiny_flux2_klein, "flux1": save_tiny_flux, "sd3": save_tiny_sd3}


def _prompts(folder: Path) -> Path:
    path = folder / "prompts.txt"
    path.write_text("a red cat\na dog\n")
    return path


def _tiny_family_args(base: Path, prompts: Path) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(base), "--resolution", str(RES), "--num_inference_steps", "3",
        "--prompts", str(prompts), "--train_batch_size", "2", "--max_train_steps", "2", "--num_eval_samples", "0",
        "--num_validation_images", "1", "--validation_prompts", "a dog", "--validation_steps", "0",
        "--report_to", "none", "--rank", "2", "--cpu_threads", "1",
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_gives_the_plain_adapter_on_flowmatch_families(family, tmp_path, checkpoint_calls):
    base = FAMILIES[family](tmp_path / "base")
    common = ["--method", "ode-am", "--truncate_steps", "2", "--reward", TINY_REWARD,
              *_tiny_family_args(base, _prompts(tmp_path)), *VALUES]
    plain = train(tmp_path / "plain", *common)
    checkpointed = train(tmp_path / "ckpt", "--gradient_checkpointing", *common)
    assert checkpoint_calls["n"] > 0
    difference = max_abs_difference(plain, checkpointed)
    report(f"tiny {family}, ode-am, fp32", difference)
    assert difference <= TOL


# -- the README's FLUX.2-klein command, every flag together ---------------------------------------------
def _bitsandbytes_on_cpu() -> str | None:
    """None when bitsandbytes' AdamW8bit steps CPU tensors here, else why not."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (`pip install bitsandbytes`, in the `test` extra)"
    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.zeros(8))
        p.grad = torch.ones(8)
        bnb.optim.AdamW8bit([p], lr=0.1).step()
    except Exception as err:  # no CPU backend in this bitsandbytes build
        return f"bitsandbytes AdamW8bit does not run on CPU here: {type(err).__name__}: {err}"
    return None


def test_readme_flux_command_flags_together_on_tiny_klein(tmp_path, checkpoint_calls):
    """README's klein command (ode-am, K = 1, bf16, checkpointing) plus 8-bit Adam, EMA, a held-out
    validation reward and checkpoints, on tiny klein with tiny reward checkpoints in the real formats
    (one tiny CLIP folder for PickScore and CLIPScore: the registry's hpsv2 and imagereward take only the
    full-size architectures)."""
    from _reward_fixtures import write_tiny_clip

    reason = _bitsandbytes_on_cpu()
    assert reason is None, reason  # bitsandbytes is in the test extra: a failure here is a failure, not a skip
    clip = write_tiny_clip(tmp_path / "clip")
    base = save_tiny_flux2_klein(tmp_path / "klein")
    out = tmp_path / "klein-am1"
    args = [
        *_tiny_family_args(base, _prompts(tmp_path)),
        "--method", "ode-am", "--truncate_steps", "1", "--reward", "pickscore",
        "--mixed_precision", "bf16", "--gradient_checkpointing", "--use_8bit_adam", "--use_ema",
        "--validation_reward", "clipscore", "--num_validation_images", "2", "--checkpointing_steps", "1",
        "--reward_model_paths", f"pickscore={clip}", f"clipscore={clip}",
    ]
    train(out, *args)
    assert checkpoint_calls["n"] > 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in log] == [1, 2] and not any(r["skipped"] for r in log)
    assert all(r["loss"] == r["loss"] and len(r["control_norm_per_step"]) == 1 for r in log)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    from diffusers_am.training.safe_state import load_state_dict

    optimizer_state = load_state_dict(out / "checkpoint-2", "training_state")["optimizer"]["state"]
    assert optimizer_state and all("__bnb_optimizer_quant_state__" in s for s in optimizer_state.values())
    validation = [json.loads(line) for line in (out / "validation_log.jsonl").read_text().splitlines()]
    assert [v["model"] for v in validation] == ["base", "fine-tuned"]
    assert all(isinstance(v["heldout_reward"], float) for v in validation)
    config = json.loads((out / "training_config.json").read_text())
    assert config["mixed_precision"] == "bf16" and config["use_8bit_adam"] and config["use_ema"]
