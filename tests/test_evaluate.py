"""`python -m diffusers_am.evaluate` and `evaluate(...)` offline: a tiny SiT digits-shaped base with
a LoRA (digits rewards + digits classifier features) and a tiny random FLUX.2-klein pipeline."""

import itertools
import json

import numpy as np
import pytest
import torch
from _tiny_pipelines import save_random_lora
from _tiny_sit import save_tiny_base_and_lora

from diffusers_am.evaluate import AdapterSampler, PipelineSampler, evaluate, main
from diffusers_am.models.sit import SiTAdapter


# -- references that share no code with diffusers_am.metrics --------------------------------------------------------
def record_samples(monkeypatch, sampler_cls) -> list[np.ndarray]:
    """The images of each ``sampler_cls.sample`` call, as float64 arrays (the real call runs unchanged)."""
    calls, real = [], sampler_cls.sample

    def sample(self, *args, **kwargs):
        images = real(self, *args, **kwargs)
        calls.append(images.detach().double().numpy().copy())
        return images

    monkeypatch.setattr(sampler_cls, "sample", sample)
    return calls


def ssim_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two [C, H, W] images in [0, 1] (Wang et al. 2004): Gaussian window (sigma 1.5) of the largest odd
    size <= 11 that fits, valid filtering, K1 = 0.01, K2 = 0.03, mean of the SSIM map over channels and pixels."""
    win = min(x.shape[-2:] + (11,))
    win -= 1 - win % 2
    g = np.exp(-((np.arange(win) - win // 2) ** 2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(a):
        a = np.apply_along_axis(np.convolve, -1, a, g, mode="valid")
        return np.apply_along_axis(np.convolve, -2, a, g, mode="valid")

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    ssim_map = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * (2 * cxy + c2) / (vx + vy + c2)
    return float(ssim_map.mean())


def within_prompt_mean(images: np.ndarray, per_prompt: int, distance) -> float:
    """Mean over prompts (consecutive groups of ``per_prompt`` images) of the mean distance over their pairs."""
    groups = images.reshape(-1, per_prompt, *images.shape[1:])
    return float(np.mean([np.mean([distance(a, b) for a, b in itertools.combinations(g, 2)]) for g in groups]))


def one_minus_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return max(0.0, 1.0 - float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))



@pytest.fixture(scope="module")
def sit_base_and_lora(tmp_path_factory):
    return save_tiny_base_and_lora(tmp_path_factory.mktemp("sit"), rank=4, seed=1, lora_name="run1")


def half_means(images: torch.Tensor) -> torch.Tensor:
    """Features [B, 2C]: the mean of each image's left and right half (the tiny SiT's samples are mostly noise, so
    the LoRA moves these far more than single pixels, and Recall / Coverage are not all 1)."""
    return torch.nn.functional.avg_pool2d(images, (images.shape[-2], images.shape[-1] // 2)).flatten(1)


def test_evaluate_sit_with_lora(sit_base_and_lora, tmp_path, monkeypatch):
    """The numbers are those of the sampled images: rewards' mean and SEM, 1 - SSIM and feature distance over each
    label's pairs, and Recall / Coverage of the LoRA's features against the base's (the prdc package, k = 2)."""
    from prdc import compute_prdc

    from diffusers_am.rewards import load_reward

    base, lora = sit_base_and_lora
    out = tmp_path / "eval"
    sampled = record_samples(monkeypatch, AdapterSampler)
    res = evaluate(
        str(base), adapters=[str(lora)], prompts=[1, 7], num_images_per_prompt=6,
        rewards=["digits", "digits-heldout"], feature_extractor=half_means, output_dir=out,
        num_inference_steps=3, progress=False, k=2,
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
    # each number recomputed from the images the sampler returned (one batch per model: base, then run1)
    assert len(sampled) == 2
    labels = [1] * 6 + [7] * 6
    for name, images in zip(models, sampled):
        for spec in ("digits", "digits-heldout"):
            r = load_reward(spec)(torch.from_numpy(images).float(), labels).double().numpy()
            assert models[name][f"reward/{spec}"] == pytest.approx(r.mean(), rel=1e-5, abs=1e-6)
            assert models[name][f"reward/{spec}/sem"] == pytest.approx(r.std(ddof=1) / 12**0.5, rel=1e-4, abs=1e-7)
        assert models[name]["diversity/ssim"] == pytest.approx(
            within_prompt_mean(images, 6, lambda a, b: 1 - ssim_numpy(a, b)), abs=2e-5)
    n, c, h, w = sampled[0].shape
    feats = {name: x.reshape(n, c, h, 2, w // 2).mean(axis=(2, 4)).reshape(n, -1) for name, x in zip(models, sampled)}
    for name in models:
        assert models[name]["diversity/feature_distance"] == pytest.approx(
            within_prompt_mean(feats[name], 6, one_minus_cosine), abs=1e-5)
    want = compute_prdc(real_features=feats["base"], fake_features=feats["run1"], nearest_k=2)
    recall_coverage = (models["run1"]["recall"], models["run1"]["coverage"])
    assert recall_coverage == (want["recall"], want["coverage"]) == (5 / 6, 2 / 3)
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


def test_evaluate_tiny_klein_with_lora(klein_folder, tmp_path, monkeypatch):
    """Each row's reward is the mean brightness of its own model's samples (base first, then the LoRA's)."""
    from _tiny_pipelines import TINY_RESOLUTION

    from diffusers_am.models import load_model_adapter

    adapter = load_model_adapter(str(klein_folder), max_sequence_length=32)
    save_random_lora(adapter, tmp_path / "klein-lora", rank=2, seed=2, std=0.3)
    sampled = record_samples(monkeypatch, AdapterSampler)
    res = evaluate(
        str(klein_folder), adapters=[str(tmp_path / "klein-lora")], prompts=["a red cat", "a dog"], num_images_per_prompt=3,
        rewards=["_tiny_pipelines:mean_brightness"], feature_extractor=lambda x: x.flatten(1), diversity="ssim",
        output_dir=None, num_inference_steps=2, resolution=TINY_RESOLUTION, progress=False,
        adapter_kwargs={"max_sequence_length": 32},
    )
    base, tuned = res["models"]["base"], res["models"]["klein-lora"]
    assert base["reward/_tiny_pipelines:mean_brightness"] != tuned["reward/_tiny_pipelines:mean_brightness"]
    assert set(tuned) >= {"recall", "coverage", "diversity/ssim"}
    assert len(sampled) == 2  # base, then the LoRA: one batch each
    for row, images in zip((base, tuned), sampled):
        assert row["reward/_tiny_pipelines:mean_brightness"] == pytest.approx(images.mean(), abs=1e-6)


@pytest.mark.parametrize("sampler", ["adapter", "pipeline"])
def test_evaluate_tiny_klein(klein_folder, tmp_path, sampler, monkeypatch):
    """Through either sampler, the reward, 1 - SSIM and feature distance are those of the sampled images."""
    from _tiny_pipelines import TINY_RESOLUTION

    folder = klein_folder
    sampled = record_samples(monkeypatch, AdapterSampler if sampler == "adapter" else PipelineSampler)
    res = evaluate(
        str(folder), prompts=["a red cat", "a dog"], num_images_per_prompt=2,
        rewards=["_tiny_pipelines:mean_brightness"], feature_extractor=lambda x: x.flatten(1), diversity="ssim,feature_distance",
        output_dir=tmp_path / "eval", num_inference_steps=2, resolution=TINY_RESOLUTION, sampler=sampler, progress=False,
        pipeline_call_kwargs={"max_sequence_length": 32}, adapter_kwargs={"max_sequence_length": 32},
    )
    m = res["models"]["base"]
    (images,) = sampled  # one batch: 2 prompts x 2 images
    brightness = images.mean(axis=(1, 2, 3))
    assert m["reward/_tiny_pipelines:mean_brightness"] == pytest.approx(brightness.mean(), abs=1e-6)
    assert m["reward/_tiny_pipelines:mean_brightness/sem"] == pytest.approx(brightness.std(ddof=1) / 2, abs=1e-6)
    assert m["diversity/ssim"] == pytest.approx(within_prompt_mean(images, 2, lambda a, b: 1 - ssim_numpy(a, b)),
                                                abs=2e-5)
    assert m["diversity/feature_distance"] == pytest.approx(within_prompt_mean(images, 2, one_minus_cosine), abs=1e-5)
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
