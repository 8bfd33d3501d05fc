"""The trainer from Python: objects instead of config strings, callbacks, the lazy top-level exports, and
the example script."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _run_helpers import _fresh_accelerate_state  # noqa: E402,F401
from _tiny_sit import tiny_pixel_pipeline  # noqa: E402

from diffusers_am.training import AdjointMatchingTrainer, TrainingConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(out, **extra):
    return {
        "output_dir": str(out), "num_inference_steps": 4, "truncate_steps": 2, "train_batch_size": 3,
        "max_train_steps": 2, "num_eval_samples": 4, "num_validation_images": 2, "validation_prompts": ["1", "7"],
        "validation_steps": 0, "report_to": "none", "rank": 2, **extra,
    }


def brightness(images, prompts):
    """A differentiable reward [B]: mean pixel value."""
    return images.mean(dim=(1, 2, 3))


class Recorder:
    def __init__(self):
        self.events = []

    def on_train_begin(self, trainer, ctx):
        self.events.append(("begin", ctx.prompts))

    def on_update_end(self, trainer, step, record):
        record["reward_mean"] = "changed here only"
        self.events.append(("update", step))

    def on_save(self, trainer, step, path):
        self.events.append(("save", step, Path(path).name))

    def on_train_end(self, trainer, result):
        self.events.append(("end", result.steps))


def test_objects_win_and_are_recorded(tmp_path):
    from peft import LoraConfig

    out = tmp_path / "run"
    recorder = Recorder()
    config = tiny_config(out, checkpointing_steps=2, reward="digits", prompts="missing-file.txt")
    trainer = AdjointMatchingTrainer(
        config,
        pipeline=tiny_pixel_pipeline(),
        reward=brightness,
        prompts=[2, 4, 4],
        lora_config=LoraConfig(r=3, lora_alpha=6, target_modules=["to_q", "to_v"]),
        callbacks=[recorder],
    )
    result = trainer.train()
    assert recorder.events == [
        ("begin", [2, 4, 4]), ("update", 1), ("update", 2), ("save", 2, "checkpoint-2"),
        ("save", 2, "pytorch_lora_weights.safetensors"), ("end", 2),
    ]
    recorded = json.loads((out / "training_config.json").read_text())
    assert recorded["reward"] == f"<callable {__name__}.brightness>"
    assert recorded["pretrained_model_name_or_path"] == "<pipeline object: SiTPipeline>"
    assert recorded["prompts"] == "<list of 3 class labels>"
    assert (recorded["rank"], recorded["lora_alpha"], recorded["lora_target_modules"]) == (3, 6.0, ["to_q", "to_v"])
    assert config["reward"] == "digits"  # the dict passed in is not changed
    weights = load_file(result.adapter_path)
    assert weights and all("to_q" in k or "to_v" in k for k in weights)
    assert {t.shape[0] for k, t in weights.items() if "lora_A" in k} == {3}
    card = (out / "README.md").read_text()
    assert f"<callable {__name__}.brightness>" in card and "base_model:" not in card
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(isinstance(r["reward_mean"], float) for r in log)  # the callback's copy changed, not the log
    # the rewards are those of the eval set (the unique prompts cycled to num_eval_samples, noise seeded by
    # derive_seed(seed, "eval")) sampled by the stock SiTPipeline: without, then with the saved adapter loaded
    from diffusers_am.prompts import derive_seed

    pipe = tiny_pixel_pipeline()

    def eval_reward():
        generator = torch.Generator().manual_seed(derive_seed(recorded["seed"], "eval"))
        images = pipe([2, 4, 2, 4], num_inference_steps=4, generator=generator, output_type="pt").images
        return float(images.double().mean())

    summary = json.loads((out / "train_summary.json").read_text())
    assert result.reward_before == summary["reward_before"] == pytest.approx(eval_reward(), abs=1e-6)
    pipe.load_lora_weights(str(out))
    assert result.reward_after == summary["reward_after"] == pytest.approx(eval_reward(), abs=1e-6)
    assert abs(result.reward_after - result.reward_before) > 1e-4  # the adapter changed the samples
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.reward_after = 0.0


def test_a_model_adapter_object_and_a_config_object(tmp_path):
    from diffusers_am.models import model_adapter_for

    model = model_adapter_for(tiny_pixel_pipeline())
    config = TrainingConfig(**tiny_config(tmp_path / "run", num_eval_samples=0, max_train_steps=1))
    result = AdjointMatchingTrainer(config, pipeline=model, reward=brightness).train()
    assert result.steps == 1 and result.reward_before is None and model.has_lora
    recorded = json.loads((tmp_path / "run" / "training_config.json").read_text())
    assert recorded["pretrained_model_name_or_path"] == "<model adapter object: SiTAdapter>"
    assert config.reward == "digits"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"config": {"learning_rat": 1e-3}}, "unknown config field(s) learning_rat"),
        ({"config": 3}, "`config` must be a TrainingConfig or a dict"),
        ({"reward": "digits"}, "`reward` must be a callable"),
        ({"prompts": "a cat"}, "`prompts` must be a non-empty list"),
        ({"prompts": [1.5]}, "`prompts` holds 1.5"),
        ({"lora_config": {"r": 4}}, "`lora_config` must be a peft.LoraConfig"),
        ({"callbacks": [object()]}, "has none of the methods on_train_begin"),
    ],
)
def test_bad_objects_are_one_line_errors(kwargs, message):
    kwargs = {"config": {}, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        AdjointMatchingTrainer(kwargs.pop("config"), **kwargs)
    assert "\n" not in str(err.value)


def test_text_encoder_options_are_refused_for_sit(tmp_path):
    pipeline = tiny_pixel_pipeline()
    trainer = AdjointMatchingTrainer(tiny_config(tmp_path / "a", offload_text_encoder=True), pipeline=pipeline)
    with pytest.raises(ValueError, match=r"`--offload_text_encoder` does not apply to SiTAdapter"):
        trainer.train()
    from diffusers_am.models import load_model_adapter

    path = tmp_path / "tiny"
    pipeline.save_pretrained(str(path))
    with pytest.raises(ValueError, match=r"`--max_sequence_length` does not apply to SiTAdapter \(it takes none\)"):
        load_model_adapter(path, max_sequence_length=77)
    with pytest.raises(ValueError, match="max_sequence_length"):
        TrainingConfig(max_sequence_length=0)


def test_text_encoder_options_reach_a_text_to_image_model_adapter(tmp_path):
    from _tiny_pipelines import save_tiny_sd3

    from diffusers_am.models import load_model_adapter

    path = save_tiny_sd3(tmp_path / "sd3")
    model = load_model_adapter(path, offload_text_encoder=True, max_sequence_length=16)
    assert model.offload_text_encoder and model.max_sequence_length == 16


def test_import_is_light_and_every_export_resolves():
    code = (
        "import sys, diffusers_am\n"
        "heavy = [m for m in ('torch', 'diffusers', 'accelerate', 'peft', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not [m for m in sys.modules if m.startswith('diffusers_am.')], 'submodules imported'\n"
        "names = [n for n in diffusers_am.__all__ if n != '__version__']\n"
        "missing = [n for n in names if getattr(diffusers_am, n, None) is None]\n"
        "assert not missing, missing\n"
        "from diffusers_am import AdjointMatchingTrainer, SiTPipeline, evaluate, available_rewards\n"
        "assert 'digits' in available_rewards() and callable(evaluate) and callable(diffusers_am.evaluate)\n"
        "print(len(names))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) >= 17
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import diffusers_am

        diffusers_am.nope


def test_example_trains_from_python(tmp_path):
    out = tmp_path / "example"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_from_python.py"), "--output_dir", str(out),
         "--max_train_steps", "2"],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("update ")] == ["update 1", "update 2"]
    assert any(line.startswith("reward before ") and "(2 updates)" in line for line in lines)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    recorded = json.loads((out / "training_config.json").read_text())
    assert recorded["reward"] == "<callable __main__.centre_brightness>"
    assert recorded["prompts"] == "<list of 3 class labels>"
    # reward_after is the centre brightness of the eval set (labels 3, 5, 8 cycled to 16, noise seeded by
    # derive_seed(seed, "eval")) sampled by the stock SiTPipeline with the saved adapter loaded
    from diffusers_am import SiTPipeline
    from diffusers_am.models import EMBEDDED_DIGITS_BASE
    from diffusers_am.prompts import derive_seed

    summary = json.loads((out / "train_summary.json").read_text())
    pipe = SiTPipeline.from_pretrained(EMBEDDED_DIGITS_BASE)
    pipe.load_lora_weights(str(out))
    generator = torch.Generator().manual_seed(derive_seed(recorded["seed"], "eval"))
    images = pipe([3, 5, 8] * 5 + [3], num_inference_steps=recorded["num_inference_steps"], generator=generator,
                  output_type="np").images  # [B, H, W, C]
    h, w = images.shape[1:3]
    want = float(images[:, h // 4 : h - h // 4, w // 4 : w - w // 4].astype("float64").mean())
    assert summary["reward_after"] == pytest.approx(want, abs=1e-6)
    assert abs(summary["reward_after"] - summary["reward_before"]) > 1e-4  # not the base model's reward
    assert f"after {summary['reward_after']:.4f} (2 updates)" in done.stdout
