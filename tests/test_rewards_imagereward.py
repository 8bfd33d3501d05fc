"""ImageReward through its real loader on a tiny ImageReward.pt + med_config.json + vocab.txt."""

import pytest
import torch
import torch.nn.functional as F

from diffusers_am.rewards.imagereward import REWARD_MEAN, REWARD_STD, load_imagereward
from _reward_fixtures import imagereward_state_dict, write_imagereward

PROMPTS = ["a red cat", "the dogs !"]


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory):
    return write_imagereward(tmp_path_factory.mktemp("imagereward"))


def _bert_block(x, sd, p, heads, enc=None):
    """One med.py BERT layer (post-LN) on the checkpoint's tensors; ``enc`` adds cross-attention."""

    def attention(h, ctx, q, mask=None):
        b, n, w = h.shape
        qq = F.linear(h, sd[q + "self.query.weight"], sd[q + "self.query.bias"])
        kk = F.linear(ctx, sd[q + "self.key.weight"], sd[q + "self.key.bias"])
        vv = F.linear(ctx, sd[q + "self.value.weight"], sd[q + "self.value.bias"])
        qq, kk, vv = (t.view(b, -1, heads, w // heads).transpose(1, 2) for t in (qq, kk, vv))
        att = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask).transpose(1, 2).reshape(b, n, w)
        out = F.linear(att, sd[q + "output.dense.weight"], sd[q + "output.dense.bias"])
        return F.layer_norm(out + h, (w,), sd[q + "output.LayerNorm.weight"], sd[q + "output.LayerNorm.bias"], eps=1e-12)

    x = attention(x, x, p + "attention.", mask=enc[1])
    x = attention(x, enc[0], p + "crossattention.")
    h = F.gelu(F.linear(x, sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]))
    h = F.linear(h, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"])
    return F.layer_norm(h + x, (x.shape[-1],), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], eps=1e-12)


def _reference(sd, pixels, ids, mask):
    """BLIP ViT (pre-LN, eps 1e-6) -> BERT with cross-attention -> MLP -> normalization."""
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=8).flatten(2).transpose(1, 2)
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd[v + "pos_embed"]
    w = x.shape[-1]
    for i in range(2):
        b = f"{v}blocks.{i}."
        h = F.layer_norm(x, (w,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        q, k, vv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).chunk(3, -1)
        q, k, vv = (t.view(x.shape[0], -1, 2, w // 2).transpose(1, 2) for t in (q, k, vv))
        att = F.scaled_dot_product_attention(q, k, vv).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(att, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (w,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])), sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    image = F.layer_norm(x, (w,), sd[v + "norm.weight"], sd[v + "norm.bias"], eps=1e-6)
    t = "blip.text_encoder."
    y = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    y = F.layer_norm(y, (y.shape[-1],), sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"], eps=1e-12)
    key_mask = mask[:, None, None, :].bool()
    for i in range(2):
        y = _bert_block(y, sd, f"{t}encoder.layer.{i}.", 2, enc=(image, key_mask))
    r = y[:, 0]
    for i in (0, 2, 4, 6, 7):
        r = F.linear(r, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
    return (r.squeeze(-1) - REWARD_MEAN) / REWARD_STD


def test_imagereward_matches_reference_and_has_gradients(ir_dir):
    reward = load_imagereward(str(ir_dir), vision_heads=2)
    images = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = reward(images, PROMPTS)
    assert out.shape == (2,) and out.dtype == torch.float32
    tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens.input_ids.shape == (2, 35) and len(reward.tokenizer) == 15
    with torch.no_grad():
        ref = _reference(imagereward_state_dict(), reward.preprocess(images), tokens.input_ids, tokens.attention_mask)
    assert torch.allclose(out.detach(), ref, atol=1e-5), (out, ref)
    out.sum().backward()
    assert images.grad.abs().sum() > 0
    assert reward.preprocess.rule == "shortest" and reward.preprocess.crop == "round"  # BLIP: torchvision CenterCrop
    # the file itself, with med_config passed explicitly
    again = load_imagereward(str(ir_dir / "ImageReward.pt"), med_config=str(ir_dir / "med_config.json"), vision_heads=2)
    assert torch.allclose(again(images, PROMPTS), out)


def test_imagereward_strict_keys(tmp_path):
    sd = imagereward_state_dict()
    sd.pop("blip.text_encoder.encoder.layer.1.crossattention.self.key.weight")
    sd["blip.itm_head.weight"] = torch.zeros(2, 32)
    write_imagereward(tmp_path, sd=sd)
    with pytest.raises(ValueError, match=r"missing keys: blip\.text_encoder\.encoder\.layer\.1\.crossattention\.self\.key\.weight.*unexpected keys: blip\.itm_head\.weight"):
        load_imagereward(str(tmp_path), vision_heads=2)


def test_imagereward_bad_inputs(ir_dir, tmp_path):
    reward = load_imagereward(str(ir_dir), vision_heads=2)
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(torch.rand(3, 3, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(-torch.rand(2, 3, 32, 32) - 0.5, PROMPTS)
    with pytest.raises(ValueError, match="head count"):
        load_imagereward(str(ir_dir))  # width 24 is neither ViT-L nor ViT-B
    write_imagereward(tmp_path)
    (tmp_path / "med_config.json").write_text('{"hidden_size": 32}')
    with pytest.raises(ValueError, match="med_config.json` lacks"):
        load_imagereward(str(tmp_path), vision_heads=2)


def test_real_size_geometry_from_checkpoint_shapes():
    """ViT-L/16 at 224 px (24 blocks, 16 heads) and the 12-layer BERT with 1024-wide cross-attention,
    read off checkpoint shapes (meta tensors: nothing allocated)."""
    from diffusers_am.rewards.imagereward import ImageRewardModel, text_config_from_med, vision_config_from_state

    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    v = "blip.visual_encoder."
    state = {v + "cls_token": meta(1, 1, 1024), v + "pos_embed": meta(1, 197, 1024),
             v + "patch_embed.proj.weight": meta(1024, 3, 16, 16), v + "blocks.0.mlp.fc1.weight": meta(4096, 1024)}
    state.update({f"{v}blocks.{i}.norm1.weight": meta(1024) for i in range(24)})
    vision = vision_config_from_state(state, None, source="meta")
    assert (vision.image_size, vision.patch_size, vision.num_hidden_layers, vision.num_attention_heads) == (224, 16, 24, 16)
    med = {"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
    with torch.device("meta"):
        model = ImageRewardModel(text_config_from_med(med, vision.hidden_size), vision)
    assert model.text.encoder.layer[11].crossattention.self.key.weight.shape == (768, 1024)
    assert model.mlp.layers[0].weight.shape == (1024, 768)
