"""LoRA written once (diffusers_am.models.lora): every family adds, saves, loads back and disables
its LoRA through the same code; fp32 trainable weights via cast_training_params; a peft.LoraConfig works."""

import pytest
import torch
from _tiny_pipelines import save_tiny_flux, save_tiny_flux2_klein, save_tiny_sd3
from _tiny_sit import tiny_pixel_pipeline
from peft import LoraConfig

from diffusers_am.models import LoraSettings, load_model_adapter
from diffusers_am.models.lora import add_lora


def _sit(tmp):
    tiny_pixel_pipeline().save_pretrained(tmp / "base")
    return tmp / "base"


FAMILIES = {
    "sit": _sit,
    "flux2": lambda tmp: save_tiny_flux2_klein(tmp / "base"),
    "flux": lambda tmp: save_tiny_flux(tmp / "base"),
    "sd3": lambda tmp: save_tiny_sd3(tmp / "base"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_add_save_load_disable_round_trip(family, tmp_path):
    base = FAMILIES[family](tmp_path)
    adapter = load_model_adapter(str(base), dtype=torch.bfloat16)
    assert not adapter.has_lora
    with adapter.adapters_disabled():  # a no-op before any LoRA
        pass
    params = adapter.add_lora(LoraSettings(rank=2, init_lora_weights=False))
    assert adapter.has_lora and params
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)  # cast_training_params
    frozen = [p for n, p in adapter.transformer.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in frozen)
    adapter.save_lora(str(tmp_path / "lora"))
    saved = {n: p.detach().clone() for n, p in adapter.transformer.named_parameters() if "lora_" in n}

    fresh = load_model_adapter(str(base))
    fresh.pipeline.load_lora_weights(str(tmp_path / "lora"))
    assert fresh.has_lora
    loaded = {n.replace(".default_0.", ".default."): p for n, p in fresh.transformer.named_parameters() if "lora_" in n}
    assert set(loaded) == set(saved)
    for name, value in saved.items():
        torch.testing.assert_close(loaded[name].float(), value)
    # disabled inside the block, on again after it
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in fresh.transformer.modules() if isinstance(m, BaseTunerLayer)]
    with fresh.adapters_disabled():
        assert layers and all(m.disable_adapters for m in layers)
    assert not any(m.disable_adapters for m in layers)
    with pytest.raises(ValueError, match="already has a LoRA"):
        fresh.add_lora(LoraSettings(rank=2))


def test_lora_config_accepted_and_bad_settings(tmp_path):
    adapter = load_model_adapter(str(_sit(tmp_path)))
    with pytest.raises(ValueError, match="rank"):
        adapter.add_lora(LoraSettings(rank=0))
    with pytest.raises(ValueError, match="'nowhere'"):
        adapter.add_lora(LoraSettings(rank=2, target_modules=["to_q", "nowhere"]))
    with pytest.raises(ValueError, match="LoraSettings or a peft.LoraConfig"):
        adapter.add_lora({"rank": 2})
    with pytest.raises(ValueError, match="no LoRA adapter to save"):
        adapter.save_lora(str(tmp_path / "none"))
    params = adapter.add_lora(LoraConfig(r=3, lora_alpha=3, target_modules=["to_q"]))
    assert params and all(p.dtype == torch.float32 for p in params)
    assert adapter.transformer.peft_config["default"].r == 3


def test_cast_training_params_keeps_frozen_dtype():
    from _tiny_sit import tiny_pixel_transformer

    model = tiny_pixel_transformer().to(torch.float16)
    params = add_lora(model, LoraConfig(r=2, target_modules=["to_q"]))
    assert params and {p.dtype for p in params} == {torch.float32}
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.float16 and not p.requires_grad for p in frozen)


def test_dtype_and_deprecated_torch_dtype(tmp_path):
    from diffusers_am import deprecation

    base = str(_sit(tmp_path))
    deprecation._WARNED.clear()
    with pytest.warns(FutureWarning, match="torch_dtype"):
        adapter = load_model_adapter(base, torch_dtype=torch.float16)
    assert adapter.transformer.dtype == torch.float16
    assert load_model_adapter(base, dtype=torch.bfloat16).transformer.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype.*torch_dtype"):
        load_model_adapter(base, dtype=torch.float16, torch_dtype=torch.float16)
