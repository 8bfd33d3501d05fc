"""One path for training validation and `python -m diffusers_am.evaluate`: the same prompt loader,
sampler, reward scoring, diversity rule; deprecated flags warn and still work; '.' in adapter names."""

import pytest
import torch
from _tiny_sit import save_tiny_base_and_lora

from diffusers_am import deprecation
from diffusers_am.evaluate import evaluate, main, read_prompts
from diffusers_am.rewards.base import WeightedReward
from diffusers_am.rewards.scoring import score_rewards
from diffusers_am.prompts import load_prompts

DIGITS = __import__("pathlib").Path(deprecation.__file__).parent / "assets" / "digits-classifier"


@pytest.fixture(scope="module")
def base_and_lora(tmp_path_factory):
    # a '.' in the LoRA's name: peft adapter names cannot hold one
    return save_tiny_base_and_lora(tmp_path_factory.mktemp("shared"), rank=2, seed=0, lora_name="run.v1")


def test_both_clis_read_the_same_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# digits to draw\n3\n\n  # indented comment\n7\n")
    assert load_prompts(f, conditioning="class") == [3, 7]
    sampler = type("S", (), {"conditioning": "class", "pipeline": None})()
    assert read_prompts(str(f), sampler) == [3, 7]
    t = tmp_path / "t.txt"
    t.write_text("# header\na cat\na dog\n")
    text = type("S", (), {"conditioning": "text", "pipeline": None})()
    assert read_prompts(str(t), text) == load_prompts(t) == ["a cat", "a dog"]
    b = tmp_path / "bin.txt"
    b.write_bytes(b"\xff\xfe\x00\x81")
    for call in (lambda: load_prompts(b), lambda: read_prompts(str(b), text)):
        with pytest.raises(ValueError, match="bin.txt.*not UTF-8"):
            call()


def test_evaluate_scores_the_stock_pipeline_samples_with_the_reward_classifier(base_and_lora):
    """The reference shares nothing with evaluate / validation: the pipeline's own ``__call__`` (LoRA loaded by
    diffusers' ``load_lora_weights``) from the noise ``torch.randn`` of the seed (one generator for all 12 images,
    the rule evaluate documents), scored by the reward classifier itself, log p(label | image) per image."""
    from diffusers_am.pipelines.sit import SiTPipeline
    from diffusers_am.toy.digits import DigitsClassifier

    base, lora = base_and_lora
    res = evaluate(str(base), adapters=[str(lora)], prompts=[1, 7], num_images_per_prompt=6, rewards=["digits"],
                   feature_extractor="digits-heldout", output_dir=None, num_inference_steps=3, seed=5,
                   batch_size=4, progress=False)
    assert list(res["models"]) == ["base", "run.v1"]
    labels = torch.tensor([1] * 6 + [7] * 6)
    noise = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(5))  # 1 channel, 8 x 8 pixels
    classifier = DigitsClassifier.from_pretrained(DIGITS).eval()
    pipe = SiTPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    for name in ("base", "run.v1"):
        if name == "run.v1":
            pipe.load_lora_weights(str(lora))
        with torch.no_grad():
            images = pipe(labels.tolist(), num_inference_steps=3, latents=noise.clone(), output_type="pt").images
            rewards = [torch.log_softmax(classifier(image[None]), -1)[0, label] for image, label in zip(images, labels)]
        assert res["models"][name]["reward/digits"] == pytest.approx(float(torch.stack(rewards).mean()), abs=1e-6)
    assert res["models"]["base"]["reward/digits"] != res["models"]["run.v1"]["reward/digits"]


def test_diversity_none_disables_and_weighted_components(base_and_lora):
    base, _ = base_and_lora
    res = evaluate(str(base), prompts=[1], num_images_per_prompt=3, rewards=["digits:1.0,digits-heldout:0.5"],
                   feature_extractor="digits-heldout", diversity="none", output_dir=None, num_inference_steps=2,
                   progress=False)
    m = res["models"]["base"]
    assert not [k for k in m if k.startswith("diversity/")]
    spec = "digits:1.0,digits-heldout:0.5"
    assert m[f"reward/{spec}"] == pytest.approx(
        m[f"reward/{spec}/digits"] + 0.5 * m[f"reward/{spec}/digits-heldout"], abs=1e-5)
    w = WeightedReward({"a": lambda x, p: x.mean((1, 2, 3)), "b": lambda x, p: -x.amax((1, 2, 3))}, {"a": 2.0, "b": 0.5})
    images = torch.rand(5, 1, 4, 4)
    scores = score_rewards(w, images, list(range(5)), batch_size=2)
    torch.testing.assert_close(scores["reward"], w(images, list(range(5))))
    torch.testing.assert_close(scores["reward"], 2.0 * scores["reward/a"] + 0.5 * scores["reward/b"])


def test_deprecated_flags_warn_and_work(base_and_lora, tmp_path, capsys):
    base, lora = base_and_lora
    common = ["--pretrained", str(base), "--prompts", "1", "--num_images_per_prompt", "2", "--rewards", "digits",
              "--feature_extractor", "digits-heldout", "--num_inference_steps", "2", "--diversity", "none"]
    deprecation._WARNED.clear()
    with pytest.warns(FutureWarning, match="--reward_model_paths"):
        assert main(common + ["--output_dir", str(tmp_path / "a"), "--reward_paths", f"digits={DIGITS}"]) == 0
    assert (tmp_path / "a" / "metrics.json").is_file()
    assert main(common + ["--output_dir", str(tmp_path / "b"), "--reward_model_paths", "digits"]) == 2
    assert "--reward_model_paths" in capsys.readouterr().err
    assert main(common + ["--output_dir", str(tmp_path / "c"), "--reward_model_paths", "x=1", "--reward_paths", "x=1"]) == 2
    deprecation._WARNED.clear()
    with pytest.warns(FutureWarning, match="torch_dtype"):
        evaluate(str(base), prompts=[1], num_images_per_prompt=2, rewards=["digits"], feature_extractor="digits-heldout",
                 diversity="none", output_dir=None, num_inference_steps=2, progress=False, torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="not both"):
        evaluate(str(base), prompts=[1], rewards=["digits"], output_dir=None, reward_paths={}, reward_model_paths={})
