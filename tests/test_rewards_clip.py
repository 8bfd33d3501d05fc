"""PickScore, CLIPScore, aesthetic and HPSv2 through their real loaders on tiny random checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_am.rewards import load_reward
from diffusers_am.rewards.aesthetic import load_aesthetic
from diffusers_am.rewards.clipscore import load_clipscore
from diffusers_am.rewards.hpsv2 import load_hpsv2, load_hpsv21
from diffusers_am.rewards.pickscore import load_pickscore
from _reward_fixtures import (
    TINY_OPEN_CLIP,
    open_clip_state_dict,
    write_aesthetic_mlp,
    write_hps_checkpoint,
    write_tiny_clip,
)

PROMPTS = ["the cat", "a red dog"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hps")
    write_hps_checkpoint(folder)
    write_hps_checkpoint(folder, filename="HPS_v2.1_compressed.pt")
    return folder


def _images(b=2, h=40, w=48, c=3):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(0)).requires_grad_(True)


def _check_reward(reward, images, prompts=PROMPTS):
    out = reward(images, prompts)
    assert out.shape == (images.shape[0],) and out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())
    return out.detach()


def test_pickscore_is_scaled_cosine(clip_dir):
    reward = load_pickscore(str(clip_dir))
    images = _images()
    out = _check_reward(reward, images)
    emb = reward.embedder
    with torch.no_grad():
        cos = F.cosine_similarity(emb.image_embeds(images), emb.text_embeds(PROMPTS), dim=-1)
    assert torch.allclose(out, emb.model.logit_scale.exp() * cos, atol=1e-5)
    assert torch.allclose(out.abs() / math.exp(math.log(1 / 0.07)), cos.abs(), atol=1e-5)


def test_clipscore_and_registry(clip_dir):
    images = _images(c=1)  # grey images are repeated to RGB
    direct = load_clipscore(str(clip_dir))
    out = direct(images, PROMPTS).detach()
    torch.testing.assert_close(out, direct(images.repeat(1, 3, 1, 1), PROMPTS).detach())  # grey == its RGB copy
    assert (out >= 0).all() and out.max() > 1  # clamped at 0, on the 0..100 scale (the value: the test above)
    via_registry = load_reward("clipscore", paths={"clipscore": str(clip_dir)})
    assert torch.allclose(via_registry(images, PROMPTS), out)
    weighted = load_reward("clipscore:0.5,pickscore:2.0", paths={"clipscore": str(clip_dir), "pickscore": str(clip_dir)})
    pick = load_pickscore(str(clip_dir))(images, PROMPTS)
    assert torch.allclose(weighted(images, PROMPTS), 0.5 * out + 2.0 * pick, atol=1e-4)


def _stock_clip(clip_dir, images):
    """(cos(image, prompt) [B], logit_scale) from transformers' CLIPModel with its own processor and tokenizer, on
    images at the model's size (32 px: the processor only normalises, with OpenAI's mean / std)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    processor = CLIPImageProcessor(do_resize=False, do_center_crop=False, do_rescale=False)
    pixels = processor(images=list(images), return_tensors="pt", input_data_format="channels_first").pixel_values
    tokens = AutoTokenizer.from_pretrained(str(clip_dir))(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(**tokens)
    image, text = [e if isinstance(e, torch.Tensor) else e.pooler_output for e in (image, text)]
    return F.cosine_similarity(image, text, dim=-1), model.logit_scale.detach().exp().item()


def test_clipscore_is_100_cos_of_the_stock_clip_model(clip_dir):
    """CLIPScore == max(100 * cos, 0), cos from the stock CLIP model (:func:`_stock_clip`)."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = load_clipscore(str(clip_dir))(images, PROMPTS)
    cos, _ = _stock_clip(clip_dir, images)
    expected = (100 * cos).clamp_min(0)
    assert expected.abs().max() > 1  # the tiny model's cosines are not all ~0 (the x100 is visible)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_pickscore_is_exp_logit_scale_cos_of_the_stock_clip_model(clip_dir):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cos, scale = _stock_clip(clip_dir, images)
    assert scale == pytest.approx(math.exp(2.6592), rel=1e-6)  # CLIPConfig's logit_scale_init_value, not 1
    torch.testing.assert_close(load_pickscore(str(clip_dir))(images, PROMPTS), scale * cos, atol=1e-4, rtol=0)


def test_clipscore_truncates_prompts_over_77_tokens(clip_dir):
    """Over 77 tokens (BOS + 75 + EOS): the prompt is cut to its first 75 tokens, EOS kept, no error."""
    reward = load_clipscore(str(clip_dir))
    emb = reward.embedder
    long = ["the " * 100, "the " * 76]
    ids = emb.tokenizer(long, padding="max_length", truncation=True, max_length=77).input_ids
    assert [len(i) for i in ids] == [77, 77] and all(i[-1] == emb.tokenizer.eos_token_id for i in ids)
    with torch.no_grad():
        text = emb.text_embeds(long + ["the " * 75, "the " * 74])
    torch.testing.assert_close(text[0], text[2])  # 100 and 76 words score as the first 75
    torch.testing.assert_close(text[1], text[2])
    assert (text[2] - text[3]).abs().max() > 1e-4  # while 74 words are all seen
    images = _images()
    out = reward(images, long).detach()  # scores, no error
    assert out.shape == (2,) and torch.isfinite(out).all()


def test_loaders_pick_their_reference_preprocessing(clip_dir, hps_dir, tmp_path):
    assert load_clipscore(str(clip_dir)).embedder.preprocess.crop == "floor"  # transformers' CLIPImageProcessor
    assert load_pickscore(str(clip_dir)).embedder.preprocess.crop == "floor"
    write_aesthetic_mlp(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", input_size=16)
    aesthetic = load_aesthetic(str(tmp_path), clip_path=str(clip_dir)).embedder.preprocess
    assert aesthetic.crop == "round" and aesthetic.rule == "shortest"  # OpenAI CLIP's torchvision transform
    hps = load_hpsv2(str(hps_dir), model_config=TINY_OPEN_CLIP).embedder.preprocess
    assert hps.rule == "longest" and hps.clamp is False  # hpsv2 resizes the float tensor, no clamp


def test_aesthetic_loader(clip_dir, tmp_path):
    mlp_file = write_aesthetic_mlp(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", input_size=16)
    reward = load_aesthetic(str(tmp_path), clip_path=str(clip_dir))
    images = _images()
    out = _check_reward(reward, images)
    sd = torch.load(mlp_file)
    with torch.no_grad():
        x = reward.embedder.image_embeds(images)
        for i in (0, 2, 4, 6, 7):
            x = F.linear(x, sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"])
    assert torch.allclose(out, x.squeeze(-1), atol=1e-5)
    # the same file passed directly; a wrong-width MLP is refused with the shapes named
    assert torch.allclose(load_aesthetic(str(mlp_file), clip_path=str(clip_dir))(images, PROMPTS), out)
    write_aesthetic_mlp(tmp_path / "wide.pth", input_size=32)
    with pytest.raises(ValueError, match="layers.0.weight"):
        load_aesthetic(str(tmp_path / "wide.pth"), clip_path=str(clip_dir))


def _open_clip_reference(sd, cfg, pixels, ids):
    """open_clip's ViT CLIP forward written directly on its state dict (pre-LN blocks, causal text)."""

    def block(x, p, heads, causal):
        b, n, w = x.shape
        h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = F.linear(h, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.view(b, n, heads, w // heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(b, n, w)
        x = x + F.linear(att, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        return x + h

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (v["width"],), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(v["layers"]):
        x = block(x, f"visual.transformer.resblocks.{i}.", v["width"] // v["head_width"], False)
    img = F.layer_norm(x[:, 0], (v["width"],), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    y = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    for i in range(t["layers"]):
        y = block(y, f"transformer.resblocks.{i}.", t["heads"], True)
    y = F.layer_norm(y, (t["width"],), sd["ln_final.weight"], sd["ln_final.bias"])
    txt = y[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return F.cosine_similarity(img, txt, dim=-1)


def test_hpsv2_matches_open_clip_forward(hps_dir):
    reward = load_hpsv2(str(hps_dir), model_config=TINY_OPEN_CLIP)
    images = _images(h=24, w=40)
    out = _check_reward(reward, images)
    emb = reward.embedder
    ids = emb.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = _open_clip_reference(open_clip_state_dict(), TINY_OPEN_CLIP, emb.preprocess(images), ids)
    assert torch.allclose(out, ref, atol=1e-5), (out, ref)
    # longest side to 32, zero pad: a 24x40 image keeps its aspect ratio (19 x 32)
    assert emb.preprocess(images).shape == (2, 3, 32, 32)
    v21 = load_hpsv21(str(hps_dir / "HPS_v2.1_compressed.pt"), model_config=TINY_OPEN_CLIP)
    assert v21.version == "v2.1"
    assert torch.allclose(v21(images, PROMPTS), out)


def test_hpsv2_refuses_wrong_keys(tmp_path):
    sd = open_clip_state_dict()
    sd.pop("visual.ln_post.bias")
    sd["visual.attnpool.weight"] = torch.zeros(1)
    write_hps_checkpoint(tmp_path, sd=sd)
    with pytest.raises(ValueError, match=r"missing keys: visual\.ln_post\.bias.*unexpected keys: visual\.attnpool\.weight"):
        load_hpsv2(str(tmp_path), model_config=TINY_OPEN_CLIP)
    with pytest.raises(ValueError, match="version"):
        load_hpsv2(str(tmp_path), version="v3")


def test_bad_inputs(clip_dir, tmp_path):
    reward = load_clipscore(str(clip_dir))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(torch.full((2, 3, 16, 16), 2.0), PROMPTS)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        reward(torch.rand(3, 16, 16), PROMPTS)
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(torch.rand(3, 3, 16, 16), PROMPTS)
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(torch.rand(1, 3, 16, 16), "the cat")
    with pytest.raises(ValueError, match="known rewards: .*aesthetic.*clipscore.*hpsv2.*imagereward.*pickscore"):
        load_reward("hps-v9")
    with pytest.raises(ValueError, match="does not exist"):
        load_pickscore(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(ValueError, match="without 'HPS_v2_compressed.pt'"):
        load_hpsv2(str(tmp_path))
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE|Hub|Offline"):
        load_hpsv2("someone/not-a-cached-repo")


def test_default_hps_architecture_is_open_clip_vit_h_14():
    """The default config builds a CLIPModel with ViT-H-14's 986.11M parameters (open_clip's count)."""
    from transformers import CLIPModel

    from diffusers_am.rewards._open_clip import VIT_H_14, clip_config_from_open_clip, expected_open_clip_keys

    with torch.device("meta"):
        model = CLIPModel(clip_config_from_open_clip(VIT_H_14))
    assert sum(p.numel() for p in model.parameters()) == 986_109_441
    assert model.vision_model.embeddings.position_embedding.weight.shape == (257, 1280)
    assert model.text_model.encoder.layers[0].self_attn.num_heads == 16
    assert len(expected_open_clip_keys(VIT_H_14)) == 6 + 4 + 4 + 12 * (24 + 32)
