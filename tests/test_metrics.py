"""Recall / Coverage against prdc, diversity metrics, LPIPS loading, validation_metrics."""

import contextlib
import io

import numpy as np
import pytest
import torch

from diffusers_am.metrics import (
    extract_features,
    load_feature_extractor,
    prdc,
    recall_coverage,
    validation_metrics,
    within_prompt_diversity,
)
from diffusers_am.metrics.diversity import get_diversity_metric, one_minus_ms_ssim, one_minus_ssim, ssim_window
from diffusers_am.metrics.lpips import NETS, LPIPS, load_lpips


@pytest.mark.parametrize("n_real,n_fake,dim,shift", [(60, 45, 8, 0.0), (50, 70, 5, 1.5), (40, 40, 16, 0.3)])
def test_prdc_matches_reference_package(n_real, n_fake, dim, shift):
    import prdc as prdc_ref

    g = torch.Generator().manual_seed(n_real + dim)
    real = torch.randn(n_real, dim, generator=g)
    fake = torch.randn(n_fake, dim, generator=g) * 0.7 + shift
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints
        ref = prdc_ref.compute_prdc(real.numpy().astype(np.float64), fake.numpy().astype(np.float64), nearest_k=5)
    ours = prdc(real, fake, k=5, chunk_size=7)  # small chunks: exercise the chunking
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(float(ref[key]), abs=1e-12), key
    assert recall_coverage(real, fake) == {"recall": ours["recall"], "coverage": ours["coverage"]}


def test_coverage_sees_mode_collapse():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 4, generator=g) * 10
    real = (centers[:, None] + torch.randn(10, 12, 4, generator=g)).reshape(-1, 4)
    fair = (centers[:, None] + torch.randn(10, 12, 4, generator=g)).reshape(-1, 4)
    collapsed = centers[:2].repeat_interleave(60, 0) + torch.randn(120, 4, generator=g)
    good, bad = recall_coverage(real, fair), recall_coverage(real, collapsed)
    assert good["coverage"] > 0.8 and bad["coverage"] < 0.3 and bad["recall"] < good["recall"]


def test_coverage_bad_inputs():
    with pytest.raises(ValueError, match="at least 6"):
        prdc(torch.randn(5, 3), torch.randn(10, 3))
    with pytest.raises(ValueError, match="widths differ"):
        prdc(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        prdc(torch.randn(10, 3, 1), torch.randn(10, 3))


def test_ssim_diversity_groups_and_small_images():
    g = torch.Generator().manual_seed(1)
    same = torch.rand(1, 1, 8, 8, generator=g).repeat(4, 1, 1, 1)
    varied = torch.rand(4, 1, 8, 8, generator=g)
    images = torch.cat([same, varied])
    labels = [3] * 4 + [7] * 4
    assert ssim_window(8, 8) == 7 and ssim_window(4, 9) == 3 and ssim_window(64, 64) == 11
    per_group_same = within_prompt_diversity(same, [3] * 4, one_minus_ssim)
    per_group_varied = within_prompt_diversity(varied, [7] * 4, one_minus_ssim)
    assert per_group_same == pytest.approx(0.0, abs=1e-6) and per_group_varied > 0.3
    both = within_prompt_diversity(images, labels, one_minus_ssim)
    assert both == pytest.approx((per_group_same + per_group_varied) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="one per image"):
        within_prompt_diversity(images, labels[:-1], one_minus_ssim)
    with pytest.raises(ValueError, match="at least 2 images"):
        within_prompt_diversity(images[:2], [1, 2], one_minus_ssim)
    with pytest.raises(ValueError, match="unknown diversity metric"):
        get_diversity_metric("fid")


def test_ms_ssim_on_large_images_and_refusal_on_small():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 176, 176, generator=g)
    d_same = one_minus_ms_ssim(x, x)
    d_diff = one_minus_ms_ssim(x, torch.rand(2, 3, 176, 176, generator=g))
    assert torch.allclose(d_same, torch.zeros(2), atol=1e-5) and (d_diff > 0.5).all()
    with pytest.raises(ValueError, match="larger than 160 px"):
        one_minus_ms_ssim(x[..., :64, :64], x[..., :64, :64])


def _write_lpips_files(folder, net="alex"):
    torch.manual_seed(5)
    model = LPIPS(net)
    trunk = {k: torch.randn_like(v) * 0.05 for k, v in model.trunk.state_dict().items()}
    trunk["classifier.1.weight"] = torch.zeros(3, 3)  # torchvision's file also holds the classifier
    torch.save(trunk, folder / NETS[net]["trunk_file"])
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(NETS[net]["channels"])}
    torch.save(lins, folder / f"lpips_v0.1_{net}.pth")
    return folder / NETS[net]["trunk_file"], folder / f"lpips_v0.1_{net}.pth"


def test_lpips_vgg_uses_torchvision_vgg16_keys():
    with torch.device("meta"):  # layout only: VGG16's 15M parameters are slow to initialize in a unit test
        metric = LPIPS("vgg")
    weights = [k for k in metric.trunk.state_dict() if k.endswith("weight")]
    assert weights == [f"features.{i}.weight" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]


def test_lpips_loads_torchvision_layout(tmp_path):
    net, size = "alex", 64
    trunk, lin = _write_lpips_files(tmp_path, net)
    metric = load_lpips(net, trunk_path=trunk, lin_path=lin)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(3, 3, size, size, generator=g), torch.rand(3, 3, size, size, generator=g)
    d = metric(x, y)
    assert d.shape == (3,) and (d > 0).all()
    assert torch.allclose(metric(x, x), torch.zeros(3), atol=1e-6)
    assert torch.allclose(metric(y, x), d, atol=1e-6)
    xg = x.clone().requires_grad_(True)
    metric(xg, y).sum().backward()
    assert xg.grad.abs().sum() > 0
    # as a diversity metric
    assert within_prompt_diversity(torch.cat([x, y]), ["a"] * 3 + ["b"] * 3, metric) > 0


def test_lpips_missing_files_say_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(ValueError, match=r"trunk file .*torch-home/hub/checkpoints/alexnet-owt-7be5be79\.pth.*not found.*TORCH_HOME"):
        load_lpips("alex")
    trunk, _ = _write_lpips_files(tmp_path, "alex")
    with pytest.raises(ValueError, match=r"linear-layer file .*lpips_v0\.1_alex\.pth.*pip download lpips"):
        load_lpips("alex", trunk_path=trunk)
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, bad)
    with pytest.raises(ValueError, match=r"missing keys: features\.0\.bias"):
        load_lpips("alex", trunk_path=bad, lin_path=tmp_path / "lpips_v0.1_alex.pth")
    metric = load_lpips("alex", trunk_path=trunk, lin_path=tmp_path / "lpips_v0.1_alex.pth")
    with pytest.raises(ValueError, match="at least 64 px"):
        metric(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))


def test_validation_metrics_with_custom_features():
    g = torch.Generator().manual_seed(4)
    images = torch.rand(12, 1, 8, 8, generator=g)
    base = torch.rand(12, 1, 8, 8, generator=g)
    labels = [0] * 6 + [1] * 6
    features = lambda x: x.flatten(1)  # noqa: E731
    reward = lambda x, c: -x.mean(dim=(1, 2, 3))  # noqa: E731
    out = validation_metrics(images, labels, base_images=base, held_out_reward=reward, features=features)
    assert set(out) == {"heldout_reward", "diversity/ssim", "diversity/feature_distance", "recall", "coverage"}
    assert out["heldout_reward"] == pytest.approx(-images.mean().item(), abs=1e-6)
    assert out == validation_metrics(images, labels, base_images=base, held_out_reward=reward, features=features)
    only = validation_metrics(images, labels, diversity=["ssim"])
    assert set(only) == {"diversity/ssim"}
    assert extract_features(features, images, batch_size=5).shape == (12, 64)
    assert load_feature_extractor(features) is features
    with pytest.raises(ValueError, match="unknown feature extractor"):
        load_feature_extractor("inception")


def test_clip_feature_extractor_from_local_folder(tmp_path):
    from _reward_fixtures import write_tiny_clip

    folder = write_tiny_clip(tmp_path / "clip")
    features = load_feature_extractor(f"clip:{folder}")
    out = features(torch.rand(3, 3, 40, 40))
    assert out.shape == (3, 16) and torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_validation_metrics_see_collapse_on_real_digits():
    """Real held-out digits vs real digits: high recall / coverage; a per-class collapse onto one
    image keeps the reward but drops diversity, recall and coverage (digits classifier features)."""
    from sklearn.datasets import load_digits

    from diffusers_am.rewards import load_reward

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    base, real = x[perm[:200]], x[perm[200:320]]
    labels = torch.tensor(data.target)[perm[200:320]].tolist()
    features, held_out = load_feature_extractor("digits-heldout"), load_reward("digits-heldout")
    fair = validation_metrics(real, labels, base_images=base, held_out_reward=held_out, features=features)
    first = {c: real[labels.index(c)] for c in set(labels)}
    collapsed = torch.stack([first[c] for c in labels])
    bad = validation_metrics(collapsed, labels, base_images=base, held_out_reward=held_out, features=features)
    assert fair["recall"] > 0.9 and fair["coverage"] > 0.9 and fair["diversity/ssim"] > 0.3
    assert bad["diversity/ssim"] == pytest.approx(0.0, abs=1e-6) and bad["diversity/feature_distance"] == pytest.approx(0.0, abs=1e-6)
    assert bad["recall"] < 0.05 and bad["coverage"] < 0.3
    assert bad["heldout_reward"] > -0.5 and fair["heldout_reward"] > -0.5  # both still look like their labels
