"""The shapes testbed and the shipped ``shapes-klein`` miniature (offline, CPU).

The data set is deterministic and its held-out compositions are new pairings only; the gold checker is
exact on the data's own images and rejects wrong captions; the shipped folder loads in the unmodified
``Flux2KleinPipeline`` and draws the captions; the rewards are in the registry; a short fine-tuning run
through ``train_adjoint_matching.py --pretrained shapes-klein`` raises the learned reward, and its adapter,
loaded with ``load_lora_weights`` into the stock pipeline from the shipped folder, reproduces the
trainer's final samples on the same noise.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _run_helpers import _fresh_accelerate_state  # noqa: E402,F401

from diffusers_am.models import EMBEDDED_SHAPES_KLEIN, pipeline_defaults, resolve_pretrained  # noqa: E402
from diffusers_am.toy import shapes  # noqa: E402

RED, GREEN, BLUE = (1.0, 0.15, 0.1), (0.1, 0.85, 0.2), (0.15, 0.3, 1.0)


# -- data ----------------------------------------------------------------------------------------
def test_dataset_is_deterministic_and_split_by_composition():
    a = shapes.make_dataset(1, "train", seed=3)
    b = shapes.make_dataset(1, "train", seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert not torch.equal(a.images, shapes.make_dataset(1, "train", seed=4).images)
    assert a.images.shape == (120, 3, 32, 32) and a.images.min() >= 0 and a.images.max() <= 1
    held = set(shapes.heldout_compositions())
    train = set(shapes.train_compositions())
    assert len(held) == 24 and len(train) == 120 and not held & train and len(held | train) == 4 * 3 * 4 * 3
    # every single object is seen on both sides in training: only the pairings are new
    assert {(c[0], c[1]) for c in train} == {(c[2], c[3]) for c in train} == {(c, s) for c in range(4) for s in range(3)}
    assert shapes.heldout_compositions() == sorted(held)  # fixed, not re-drawn per call
    for comp in shapes.all_compositions():
        assert shapes.parse_caption(shapes.caption(comp)) == comp


def test_render_draws_what_the_caption_says():
    """Pixels checked by hand: a red square left (centre 8, 16; half-size 5) and a blue circle right."""
    layout = shapes.ShapesLayout(left_xy=(8.0, 16.0), right_xy=(24.0, 16.0), left_r=5.0, right_r=5.0)
    img = shapes.render((0, 1, 2, 0), layout)  # red square, blue circle
    assert torch.allclose(img[:, 16, 8], torch.tensor(RED), atol=1e-6)
    assert torch.allclose(img[:, 16, 24], torch.tensor(BLUE), atol=1e-6)
    assert torch.allclose(img[:, 11, 3], torch.tensor(RED), atol=1e-6)  # square corner (x 3..13, y 11..21) is filled
    assert img[:, 11, 19].max() == 0  # the circle's bounding-box corner is empty
    assert img[:, 2, 16].max() == 0 and img[:, 30, 30].max() == 0  # black background


def test_gold_checker_is_exact_on_the_data_and_rejects_wrong_captions():
    data = shapes.make_dataset(2, "all", seed=7)
    assert shapes.gold_check(data.images, data.captions).all()  # 100% on the data's own images
    swapped, recoloured = [], []
    for comp in data.compositions.tolist():
        lc, ls, rc, rs = comp
        swapped.append(shapes.caption((rc, rs, lc, ls)))
        recoloured.append(shapes.caption(((lc + 1) % 4, ls, rc, rs)))
    same_both_sides = torch.tensor([(c[0], c[1]) == (c[2], c[3]) for c in data.compositions.tolist()])
    assert not shapes.gold_check(data.images, swapped)[~same_both_sides].any()
    assert not shapes.gold_check(data.images, recoloured).any()
    # an empty image, a single object, and a green blob of the wrong shape are not matches
    one = shapes.render((1, 0, 1, 0), shapes.ShapesLayout((8.0, 16.0), (24.0, 16.0), 5.0, 5.0))
    one[:, :, 16:] = 0
    assert shapes.gold_check(torch.stack([torch.zeros(3, 32, 32), one]), ["a green circle to the left of a green circle"] * 2).tolist() == [False, False]
    with pytest.raises(ValueError, match="not a shapes caption"):
        shapes.gold_check(data.images[:1], ["a purple circle to the left of a red square"])


# -- rewards ---------------------------------------------------------------------------------------
def test_rewards_are_registered_and_behave():
    from diffusers_am.rewards import load_reward, probe_reward

    data = shapes.make_dataset(1, "heldout", seed=5)
    wrong = [shapes.caption(((c[0] + 1) % 4, (c[1] + 1) % 3, c[2], c[3])) for c in data.compositions.tolist()]
    for name in ("shapes", "shapes-heldout"):
        reward = load_reward(name)
        right_r, wrong_r = reward(data.images, data.captions), reward(data.images, wrong)
        assert right_r.shape == (24,) and (right_r <= 0).all()
        assert (right_r > wrong_r).float().mean() >= 0.9  # held-out compositions: the classifiers still read them
        probe_reward(reward, data.images[:4], data.captions[:4], name)  # differentiable in the images
        assert reward.features(data.images).shape[0] == 24
    gold = load_reward("shapes-gold")
    assert gold(data.images, data.captions).tolist() == [1.0] * 24 and gold(data.images, wrong).sum() == 0
    with pytest.raises(ValueError, match="not differentiable"):
        probe_reward(gold, data.images[:4], data.captions[:4], "shapes-gold")


# -- the shipped miniature ---------------------------------------------------------------------------
def test_shipped_pipeline_loads_in_the_stock_class_and_follows_prompts():
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    assert Path(resolve_pretrained("shapes-klein")) == EMBEDDED_SHAPES_KLEIN
    assert Path(resolve_pretrained("Shapes-Klein")) == EMBEDDED_SHAPES_KLEIN
    pipe = Flux2KleinPipeline.from_pretrained(EMBEDDED_SHAPES_KLEIN)
    assert type(pipe) is Flux2KleinPipeline
    assert isinstance(pipe.transformer, Flux2Transformer2DModel) and isinstance(pipe.vae, AutoencoderKLFlux2)
    assert isinstance(pipe.text_encoder, Qwen3ForCausalLM)
    defaults = pipeline_defaults("shapes-klein", "training")
    assert defaults["reward"] == "shapes" and Path(defaults["prompts"]).is_file()
    prompts = shapes.train_captions()[::15]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=prompts, height=32, width=32, num_inference_steps=defaults["num_inference_steps"],
                  guidance_scale=defaults["guidance_scale"], max_sequence_length=defaults["max_sequence_length"],
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (len(prompts), 3, 32, 32)
    # the samples are drawings of the captions (the gold checker reads pixels only), not noise
    assert shapes.gold_check(images, prompts).float().mean() >= 0.25


def _capture_context():
    class Capture:
        def on_train_begin(self, trainer, ctx):
            self.ctx = ctx

    return Capture()


def test_short_fine_tuning_raises_the_reward_and_the_adapter_round_trips(tmp_path):
    """``--pretrained shapes-klein`` with its folder defaults (reward, prompts, resolution, steps), a few
    updates; the saved adapter in the stock pipeline reproduces the trainer's final samples (same noise)."""
    from diffusers import Flux2KleinPipeline

    from diffusers_am.sampling import sample_images
    from diffusers_am.training import AdjointMatchingTrainer
    from diffusers_am.training.config import parse_args

    out = tmp_path / "run"
    config = parse_args([
        "--pretrained", "shapes-klein", "--output_dir", str(out), "--max_train_steps", "8", "--train_batch_size", "8",
        "--num_inference_steps", "8", "--truncate_steps", "2", "--num_eval_samples", "16",
        "--validation_steps", "0", "--num_validation_images", "2", "--report_to", "none",
        "--validation_prompts", *shapes.heldout_captions()[:3],
    ])
    assert config.reward == "shapes" and config.resolution == 32 and config.max_sequence_length == 24
    capture = _capture_context()
    result = AdjointMatchingTrainer(config, callbacks=[capture]).train()
    assert result.reward_after > result.reward_before + 0.03  # measured: -0.7245 -> -0.6512 (seeded)

    ctx = capture.ctx
    conditions, noise = ctx.eval_set
    with torch.no_grad():
        _, final = sample_images(ctx.adapter, conditions, noise, ctx.times, guidance_scale=config.guidance_scale)
    reward = ctx.reward(final, conditions).mean().item()
    assert reward == pytest.approx(result.reward_after, abs=1e-4)  # these are the samples the trainer scored

    pipe = Flux2KleinPipeline.from_pretrained(EMBEDDED_SHAPES_KLEIN)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))
    stock = pipe(prompt=list(conditions), latents=noise, height=32, width=32, num_inference_steps=8,
                 guidance_scale=config.guidance_scale, max_sequence_length=24, output_type="pt").images
    torch.testing.assert_close(stock, final, atol=1e-4, rtol=0)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["reward_after"] == pytest.approx(result.reward_after)
    # the held-out judge scored the validation grids of the base and the fine-tuned model
    log = [json.loads(line) for line in (out / "validation_log.jsonl").read_text().splitlines()]
    assert [r["model"] for r in log] == ["base", "fine-tuned"] and all(0 <= r["heldout_reward"] <= 1 for r in log)


def test_folder_defaults_fill_only_unset_options(tmp_path):
    from diffusers_am.training.config import parse_args

    cfg = parse_args(["--pretrained", "shapes-klein", "--reward", "shapes-heldout", "--num_inference_steps", "7"])
    assert cfg.reward == "shapes-heldout" and cfg.num_inference_steps == 7  # flags win
    assert cfg.resolution == 32 and cfg.prompts == str(EMBEDDED_SHAPES_KLEIN / "prompts_train.txt")
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"guidance_scale": 2.0}))
    assert parse_args(["--pretrained", "shapes-klein", "--config", str(config_file)]).guidance_scale == 2.0  # the file wins
    assert parse_args([]).reward == "digits"  # the digits default job is unchanged
    assert pipeline_defaults("shapes-klein", "evaluate")["rewards"] == ["shapes-gold", "shapes", "shapes-heldout"]
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "diffusers_am_defaults.json").write_text(json.dumps({"training": {"prompts": "../secret.txt"}}))
    (tmp_path / "secret.txt").write_text("x\n")
    with pytest.raises(ValueError, match="not a file in that folder"):
        pipeline_defaults(folder, "training")
    (folder / "diffusers_am_defaults.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        pipeline_defaults(folder, "training")
    assert pipeline_defaults(tmp_path, "training") == {}  # no defaults file: nothing
