"""The embedded digits testbed: data, shipped classifiers as rewards, shipped SiT base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffusers_am.rewards import load_reward
from diffusers_am.rewards.digits import (
    DIGITS_CLASSIFIER,
    DIGITS_HELDOUT_CLASSIFIER,
    DigitsReward,
    load_digits_heldout_reward,
    load_digits_reward,
)
from diffusers_am.toy.digits import (
    DigitsClassifier,
    DigitsClassifierConfig,
    as_class_labels,
    classifier_accuracy,
    digits_split,
    from_flow_space,
    to_flow_space,
)

REWARDS = {"digits": load_digits_reward, "digits-heldout": load_digits_heldout_reward}


@pytest.fixture(scope="module")
def split():
    return digits_split(seed=0)


@pytest.fixture(scope="module", params=sorted(REWARDS))
def reward(request) -> DigitsReward:
    return REWARDS[request.param]()


def test_split_is_fixed_stratified_and_in_range(split):
    assert split.train_images.shape == (1437, 1, 8, 8) and split.test_images.shape == (360, 1, 8, 8)
    assert split.train_images.min() >= 0 and split.train_images.max() <= 1
    assert torch.bincount(split.test_labels, minlength=10).min() >= 35  # stratified: ~36 per class
    again = digits_split(seed=0)
    assert torch.equal(again.test_labels, split.test_labels) and torch.equal(again.train_images, split.train_images)
    other = digits_split(seed=1)
    assert not torch.equal(other.test_labels, split.test_labels)
    x = to_flow_space(split.train_images[:4])
    assert x.min() >= -1 and x.max() <= 1 and torch.allclose(from_flow_space(x), split.train_images[:4])
    with pytest.raises(ValueError, match="test_fraction"):
        digits_split(test_fraction=1.5)


def test_shipped_classifiers_are_accurate_small_and_independent(split):
    clf = DigitsClassifier.from_pretrained(DIGITS_CLASSIFIER)
    held = DigitsClassifier.from_pretrained(DIGITS_HELDOUT_CLASSIFIER)
    assert classifier_accuracy(clf, split.test_images, split.test_labels) >= 0.97
    assert classifier_accuracy(held, split.test_images, split.test_labels) >= 0.97
    assert clf.config != held.config  # another architecture, not only another seed
    for folder in (DIGITS_CLASSIFIER, DIGITS_HELDOUT_CLASSIFIER):
        assert sum(f.stat().st_size for f in folder.iterdir()) < 2e6
        assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # safetensors only
        assert json.loads((folder / "config.json").read_text())["architecture"] == "DigitsClassifier"


def test_classifier_roundtrip_is_exact(tmp_path, split):
    model = DigitsClassifier(DigitsClassifierConfig(channels=[4, 8], feature_dim=6, activation="gelu", downsample="stride"))
    model.save_pretrained(tmp_path / "clf", extra_config={"note": "tiny"})
    loaded = DigitsClassifier.from_pretrained(tmp_path / "clf")
    x = split.test_images[:5]
    assert torch.equal(model(x), loaded(x)) and loaded.features(x).shape == (5, 6)
    (tmp_path / "clf" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        DigitsClassifier.from_pretrained(tmp_path / "clf")
    with pytest.raises(ValueError, match="activation"):
        DigitsClassifierConfig(activation="tanh")
    with pytest.raises(ValueError, match="kernel_size"):
        DigitsClassifierConfig(kernel_size=4)


def test_reward_is_log_prob_of_the_conditioning_class(reward, split):
    images, labels = split.test_images[:40], split.test_labels[:40]
    right = reward(images, labels.tolist())
    wrong = reward(images, ((labels + 3) % 10).tolist())
    assert right.shape == (40,) and right.dtype == torch.float32
    assert (right <= 0).all() and (right > wrong).float().mean() >= 0.95
    probs = reward.log_probs(images).exp()
    assert torch.allclose(probs.sum(-1), torch.ones(40), atol=1e-5)
    assert torch.allclose(right, probs.gather(1, labels[:, None]).squeeze(1).log(), atol=1e-5)


def test_reward_is_differentiable_and_frozen(reward, split):
    images = split.test_images[:6].clone().requires_grad_(True)
    reward(images, split.test_labels[:6].tolist()).sum().backward()
    assert torch.isfinite(images.grad).all() and (images.grad.abs().sum(dim=(1, 2, 3)) > 0).all()
    assert all(not p.requires_grad for p in reward.parameters())
    assert all(p.grad is None for p in reward.parameters())
    torch.nn.Sequential(reward).train()  # a parent put in train mode leaves the reward frozen
    assert not reward.training and not reward.classifier.training


def test_reward_accepts_rgb_and_other_sizes_differentiably(reward, split):
    grey = split.test_images[:8]
    labels = split.test_labels[:8].tolist()
    rgb = grey.expand(-1, 3, -1, -1)
    assert torch.allclose(reward(rgb, labels), reward(grey, labels), atol=1e-5)  # luma weights sum to 1
    big = torch.nn.functional.interpolate(grey, size=(32, 32), mode="nearest").expand(-1, 3, -1, -1).clone()
    big.requires_grad_(True)
    r = reward(big, labels)
    assert (r > reward(big.detach(), [(l + 5) % 10 for l in labels])).float().mean() >= 0.75
    r.sum().backward()
    assert torch.isfinite(big.grad).all() and big.grad.abs().sum() > 0
    feats = reward.features(big.detach())
    assert feats.shape[0] == 8 and feats.dim() == 2 and torch.isfinite(feats).all()


def test_reward_rejects_bad_input(split):
    reward = load_digits_reward()
    images = split.test_images[:3]
    with pytest.raises(ValueError, match="out of range"):
        reward(images, [1, 2, 10])
    with pytest.raises(ValueError, match="not a class label"):
        reward(images, [1, 2, "seven"])
    with pytest.raises(ValueError, match="batch size"):
        reward(images, [1, 2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(images * 2 - 1, [1, 2, 3])
    with pytest.raises(ValueError, match="C in"):
        reward(torch.rand(3, 2, 8, 8), [1, 2, 3])
    assert as_class_labels(["3", torch.tensor(4), 5]).tolist() == [3, 4, 5]


def test_missing_asset_folder_says_where_files_belong(tmp_path):
    with pytest.raises(ValueError, match="train_digits_classifiers.py"):
        load_digits_reward(path=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="digits-heldout-classifier"):
        load_digits_heldout_reward(path=tmp_path / "nowhere")


def test_rewards_load_by_name_with_dtype(split):
    digits = load_reward("digits", dtype=torch.float64)
    assert next(digits.parameters()).dtype == torch.float64
    combo = load_reward("digits:1.0,digits-heldout:0.5")
    labels = split.test_labels[:4].tolist()
    images = split.test_images[:4]
    expected = load_digits_reward()(images, labels) + 0.5 * load_digits_heldout_reward()(images, labels)
    assert torch.allclose(combo(images, labels), expected, atol=1e-6)


# -- the shipped base ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_pipeline():
    from diffusers_am.models import EMBEDDED_DIGITS_BASE
    from diffusers_am.pipelines.sit import SiTPipeline

    pipe = SiTPipeline.from_pretrained(str(EMBEDDED_DIGITS_BASE))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_base_is_small_safetensors_with_defaults():
    from diffusers_am.models import EMBEDDED_DIGITS_BASE

    files = [f for f in Path(EMBEDDED_DIGITS_BASE).rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 5e6
    assert any(f.name.endswith(".safetensors") for f in files)
    assert not any(f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl") for f in files)
    defaults = json.loads((Path(EMBEDDED_DIGITS_BASE) / "diffusers_am_defaults.json").read_text())
    index = json.loads((Path(EMBEDDED_DIGITS_BASE) / "model_index.json").read_text())
    assert index["_class_name"] == "SiTPipeline" and index["default_num_inference_steps"] == defaults["num_inference_steps"]
    assert defaults["guidance_scale"] >= 1.0 and defaults["resolution"] == 8


def test_shipped_base_loads_offline_and_samples_digits(base_pipeline):
    pipe = base_pipeline
    assert pipe.resolution == 8 and pipe.num_classes == 10 and pipe.vae is None
    labels = list(range(10)) * 10
    images = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (100, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    # README: 98.2% held-out accuracy (1000 samples, default guidance); on 100 samples the binomial standard error
    # is 1.3%, and 3 of them below 98.2% is 94.2%
    accuracy = (load_digits_heldout_reward().log_probs(images).argmax(-1) == torch.tensor(labels)).float().mean()
    assert accuracy >= 0.942, float(accuracy)


def test_shipped_base_through_the_adapter_gives_a_differentiable_reward(base_pipeline):
    from diffusers_am.models import EMBEDDED_DIGITS_BASE, load_model_adapter

    adapter = load_model_adapter(EMBEDDED_DIGITS_BASE)
    assert adapter.conditioning == "class" and adapter.default_resolution == 8
    encoded = adapter.encode_conditions([3, 7])
    flow = adapter.flow(encoded)
    x = adapter.initial_noise(2, 8, torch.Generator().manual_seed(0))
    assert adapter.default_num_inference_steps == 20
    times = adapter.time_grid(6, 8)
    with torch.no_grad():
        for k in range(len(times) - 1):
            x = x + (times[k + 1] - times[k]) * flow.base_velocity(x, times[k])
    x = x.requires_grad_(True)
    reward = load_reward("digits")(adapter.decode(x), [3, 7])
    reward.sum().backward()
    assert reward.shape == (2,) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
