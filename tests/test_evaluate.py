"""`python -m diffusers_am.evaluate` and `evaluate(...)` offline: a tiny SiT digits-shaped base with
a LoRA (digits rewards + digits classifier features) and a tiny random FLUX.2-klein pipeline."""

import json

import pytest
import torch
from _tiny_pipelines import save_random_lora
from _tiny_sit import save_tiny_base_and_lora

from diffusers_am.evaluate import evaluate, main
from diffusers_am.models.sit import SiTAdapter


@pytest.fixture(scope="module")
def sit_base_and_lora(tmp_path_factory):
    return save_tiny_base_and_lora(tmp_path_factory.mktemp("sit"), rank=4, seed=1, lora_name="run1")


def test_evaluate_sit_with_lora(sit_base_and_lora, tmp_path):
    base, lora = sit_base_and_lora
    out = tmp_path / "eval"
    res = evaluate(
        str(base), adapters=[str(lora)], prompts=[1, 7], num_images_per_prompt=6,
        rewards=["digits", "digits-heldout"], feature_extractor="digits-heldout", output_dir=out,
        num_inference_steps=3, progress=False,
    )
    models = res["models"]
    assert list(models) == ["base", "run1"]
    assert set(models["run1"]) == {
        "reward/digits", "reward/digits/sem", "reward/digits-heldout", "reward/digits-heldout/sem",
        "diversity/ssim", "diversity/feature_distance", "recall", "coverage",
    }
    assert "recall" not in models["base"]
    assert all(v <= 0 for k, v in models["base"].items() if k.startswith("reward/") and not k.endswith("/sem"))
    assert models["base"]["reward/digits"] != models["run1"]["reward/digits"]  # the LoRA changed the samples
    assert 0 <= models["run1"]["coverage"] <= 1 and 0 <= models["run1"]["recall"] <= 1
    saved = json.loads((out / "metrics.json").read_text())
    for name in models:
        assert saved["models"][name] == pytest.approx(models[name])
    table = (out / "metrics.md").read_text()
    assert table.startswith("| model | reward/digits | reward/digits-heldout | diversity/ssim") and "| run1 |" in table
    for f in ("plot_reward_digits.png", "plot_coverage.png", "reward_vs_diversity.png", "samples_base.png", "samples_run1.png"):
        assert (out / f).stat().st_size > 0, f
    # same seed, same numbers: the base row does not depend on which adapters are evaluated
    again = evaluate(str(base), prompts=[1, 7], num_images_per_prompt=6, rewards=["digits"],
                     feature_extractor="digits-heldout", output_dir=None, num_inference_steps=3, progress=False)
    assert again["models"]["base"]["reward/digits"] == pytest.approx(models["base"]["reward/digits"], abs=1e-6)


def test_cli_on_sit_and_bad_inputs(sit_base_and_lora, tmp_path, capsys):
    base, lora = sit_base_and_lora
    prompts = tmp_path / "labels.txt"
    prompts.write_text("3\n5\n")
    main(["--pretrained_model_name_or_path", str(base), "--adapters", str(lora), "--prompts", str(prompts),
          "--num_images_per_prompt", "3", "--rewards", "digits", "--feature_extractor", "digits",
          "--diversity", "ssim", "--num_inference_steps", "2", "--output_dir", str(tmp_path / "cli")])
    printed = capsys.readouterr().out
    assert "| run1 |" in printed and (tmp_path / "cli" / "metrics.md").is_file()
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        evaluate(str(base), num_images_per_prompt=0, output_dir=None)
    with pytest.raises(ValueError, match="does not exist"):
        evaluate(str(base), adapters=[str(tmp_path / "nope")], output_dir=None)
    with pytest.raises(ValueError, match="k = 5"):
        evaluate(str(base), adapters=[str(lora)], prompts=[1], num_images_per_prompt=2, rewards=[], feature_extractor="digits", output_dir=None, progress=False)
    with pytest.raises(ValueError, match="known rewards"):
        evaluate(str(base), prompts=[1], rewards=["nope"], output_dir=None, progress=False)


def test_cli_bad_arguments_are_one_line_and_write_nothing(sit_base_and_lora, tmp_path, capsys):
    base, lora = sit_base_and_lora
    stray = tmp_path / "not-an-adapter"
    stray.mkdir()
    torch.save({"lora_A": torch.ones(2)}, stray / "x.bin")  # a random weight file must never be loaded
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(bytes(range(256)))
    (tmp_path / "a-file").write_text("x")
    scalar = tmp_path / "scalar_reward.py"
    scalar.write_text("def reward(images, prompts):\n    return images.mean()\n")
    out = tmp_path / "eval"
    common = ["--pretrained_model_name_or_path", str(base), "--num_inference_steps", "2", "--output_dir", str(out),
              "--rewards", "digits", "--feature_extractor", "digits"]
    cases = [
        (["--adapters", str(tmp_path / "missing")], f"adapter {str(tmp_path / 'missing')!r} does not exist"),
        (["--adapters", str(stray)], f"adapter folder {str(stray)!r} holds no pytorch_lora_weights.safetensors"),
        (["--adapters", str(stray / "x.bin")], "is not a .safetensors LoRA file"),
        (["--num_images_per_prompt", "0"], "`num_images_per_prompt` must be an integer >= 1; got 0."),
        (["--adapters", str(lora), "--prompts", "1", "--num_images_per_prompt", "2"], "Recall/Coverage with k = 5"),
        (["--k", "0"], "`k` must be an integer >= 1; got 0."),
        (["--prompts", str(binary)], f"`--prompts` file {str(binary)!r} is not UTF-8 text"),
        (["--output_dir", str(tmp_path / "a-file")], "is a file; pass a folder"),
        (["--device", "nonsense"], "`device` 'nonsense' is not a torch device"),
        (["--prompts", "1", "--rewards", f"{scalar}:reward"], "must return one value per image, shape [6]"),
        (["--pretrained_model_name_or_path", str(tmp_path / "nope")], "nope"),
    ]
    for extra, line in cases:
        assert main(common + extra) == 2, extra
        captured = capsys.readouterr()
        err = [x for x in captured.err.replace("\r", "\n").splitlines() if x.strip() and "it/s" not in x]
        assert len(err) == 1 and err[0].startswith("error: ") and line in err[0], (extra, captured.err)
        assert not out.exists() and "Traceback" not in captured.err
    with pytest.raises(SystemExit) as exit_info:
        main(["--num_images_per_prompt", "many"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: argument --num_images_per_prompt")


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    from _tiny_pipelines import save_tiny_flux2_klein

    return save_tiny_flux2_klein(tmp_path_factory.mktemp("klein") / "pipe")


def test_evaluate_tiny_klein_with_lora(klein_folder, tmp_path):
    from _tiny_pipelines import TINY_RESOLUTION

    from diffusers_am.models import load_model_adapter

    adapter = load_model_adapter(str(klein_folder), max_sequence_length=32)
    save_random_lora(adapter, tmp_path / "klein-lora", rank=2, seed=2, std=0.3)
    res = evaluate(
        str(klein_folder), adapters=[str(tmp_path / "klein-lora")], prompts=["a red cat", "a dog"], num_images_per_prompt=3,
        rewards=["_tiny_pipelines:mean_brightness"], feature_extractor=lambda x: x.flatten(1), diversity="ssim",
        output_dir=None, num_inference_steps=2, resolution=TINY_RESOLUTION, progress=False,
        adapter_kwargs={"max_sequence_length": 32},
    )
    base, tuned = res["models"]["base"], res["models"]["klein-lora"]
    assert base["reward/_tiny_pipelines:mean_brightness"] != tuned["reward/_tiny_pipelines:mean_brightness"]
    assert set(tuned) >= {"recall", "coverage", "diversity/ssim"}


@pytest.mark.parametrize("sampler", ["adapter", "pipeline"])
def test_evaluate_tiny_klein(klein_folder, tmp_path, sampler):
    from _tiny_pipelines import TINY_RESOLUTION

    folder = klein_folder
    res = evaluate(
        str(folder), prompts=["a red cat", "a dog"], num_images_per_prompt=2,
        rewards=["_tiny_pipelines:mean_brightness"], feature_extractor=lambda x: x.flatten(1), diversity="ssim,feature_distance",
        output_dir=tmp_path / "eval", num_inference_steps=2, resolution=TINY_RESOLUTION, sampler=sampler, progress=False,
        pipeline_call_kwargs={"max_sequence_length": 32}, adapter_kwargs={"max_sequence_length": 32},
    )
    m = res["models"]["base"]
    assert 0 <= m["reward/_tiny_pipelines:mean_brightness"] <= 1 and m["diversity/ssim"] > 0
    assert (tmp_path / "eval" / "metrics.md").is_file()
    with pytest.raises(ValueError, match="prompts` is required"):
        evaluate(str(folder), rewards=[], output_dir=None, sampler=sampler)


def test_cli_defaults_on_embedded_digits_base(tmp_path, capsys):
    """`python -m diffusers_am.evaluate` with its defaults: the shipped digits base, digits rewards,
    held-out classifier features, 1 - SSIM and feature diversity; plus one LoRA."""
    from diffusers_am.models import EMBEDDED_DIGITS_BASE

    save_random_lora(SiTAdapter.from_pretrained(str(EMBEDDED_DIGITS_BASE)), tmp_path / "digits-lora", rank=2, seed=3,
                     std=0.05)
    assert main(["--adapters", str(tmp_path / "digits-lora"), "--prompts", "0", "4", "--num_images_per_prompt", "4",
                 "--num_inference_steps", "4", "--output_dir", str(tmp_path / "eval")]) == 0
    res = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert res["config"]["rewards"] == ["digits", "digits-heldout"] and res["config"]["feature_extractor"] == "digits-heldout"
    assert res["config"]["diversity"] == ["ssim", "feature_distance"]
    assert set(res["models"]) == {"base", "digits-lora"} and "coverage" in res["models"]["digits-lora"]
    assert "| digits-lora |" in capsys.readouterr().out


def test_default_rewards_come_from_the_registry(klein_folder, monkeypatch):
    """Without `rewards`, evaluate scores the registry's EVALUATION_REWARDS entry for the base's kind ("text")."""
    from _tiny_pipelines import TINY_RESOLUTION

    from diffusers_am import rewards as registry

    monkeypatch.setitem(registry.EVALUATION_REWARDS, "text", ("_tiny_pipelines:mean_brightness",))
    res = evaluate(
        str(klein_folder), prompts=["a red cat"], num_images_per_prompt=2, feature_extractor=lambda x: x.flatten(1),
        diversity="none", output_dir=None, num_inference_steps=2, resolution=TINY_RESOLUTION, progress=False,
        adapter_kwargs={"max_sequence_length": 32},
    )
    scored = [k for k in res["models"]["base"] if k.startswith("reward/") and not k.endswith("/sem")]
    assert res["config"]["rewards"] == ["_tiny_pipelines:mean_brightness"]
    assert scored == ["reward/_tiny_pipelines:mean_brightness"]
