"""--cache_prompt_embeddings: the cache reproduces the encoder exactly; trained adapters match the uncached run."""

from pathlib import Path

import pytest
import torch
from _tiny_pipelines import TINY_RESOLUTION as RES
from _tiny_pipelines import save_tiny_flux2_klein
from _run_helpers import _fresh_accelerate_state  # noqa: F401  (fixture)
from _scripts import load_script

from diffusers_am.models import load_model_adapter
from diffusers_am.training.config import TrainingConfig

PROMPTS = ["a red cat", "a dog", "two birds", "a red cat", "a boat"]


@pytest.fixture(scope="module")
def klein_base_dir(tmp_path_factory):
    return save_tiny_flux2_klein(tmp_path_factory.mktemp("klein-base"), is_distilled=False, seed=1)


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    return save_tiny_flux2_klein(tmp_path_factory.mktemp("klein"), is_distilled=True)


def test_cache_equals_encoder_and_frees_text_encoder(klein_base_dir, tmp_path):
    adapter = load_model_adapter(klein_base_dir, max_sequence_length=16)
    batch = ["a boat", "a red cat", "a boat"]
    expected = adapter.encode_conditions(batch)
    encoder_bytes = sum(p.numel() * p.element_size() for p in adapter.pipeline.text_encoder.parameters())
    count, cached, freed = adapter.cache_prompts(PROMPTS, chunk_size=3, cache_dir=str(tmp_path), key="tiny")
    assert count == 4 and cached > 0 and freed >= encoder_bytes > 0
    assert adapter.pipeline.text_encoder is None
    got = adapter.encode_conditions(batch)
    for name in ("prompt_embeds", "text_ids", "negative_prompt_embeds", "negative_text_ids"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert got.negative_prompt_embeds.shape[0] == 1  # the empty prompt stays shared
    with pytest.raises(ValueError, match="not in the prompt cache"):
        adapter.encode_conditions(["an unseen prompt"])
    # a second adapter reads the disk cache (no encoding) and gives the same batch
    files = list(tmp_path.glob("prompt_embeddings-*.safetensors"))
    assert len(files) == 1
    other = load_model_adapter(klein_base_dir, max_sequence_length=16)
    other.pipeline.text_encoder.forward = None  # encoding would fail: the cache must come from disk
    other.cache_prompts(PROMPTS, chunk_size=3, cache_dir=str(tmp_path), key="tiny")
    again = other.encode_conditions(batch)
    assert torch.equal(again.prompt_embeds, expected.prompt_embeds)
    assert torch.equal(again.negative_prompt_embeds, expected.negative_prompt_embeds)


def test_prompt_cache_dir_needs_the_flag():
    with pytest.raises(ValueError, match="--prompt_cache_dir"):
        TrainingConfig(prompt_cache_dir="cache")


def _main():
    return load_script("train_adjoint_matching.py", "train_adjoint_matching", register=False).main


def test_cached_updates_equal_uncached_on_tiny_klein(klein_dir, tmp_path, capsys):
    """Two ode-am updates with and without the cache: the saved adapters agree to <= 1e-6."""
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na dog\ntwo birds\n")
    reward = f"{Path(__file__).resolve().parent / '_tiny_pipelines.py'}:mean_brightness"
    weights = []
    for extra in ([], ["--cache_prompt_embeddings", "--prompt_cache_dir", str(tmp_path / "cache")]):
        out = tmp_path / ("cached" if extra else "plain")
        status = _main()([
            "--pretrained_model_name_or_path", str(klein_dir), "--truncate_steps", "2", "--num_inference_steps", "3",
            "--resolution", str(RES), "--reward", reward, "--prompts", str(prompts), "--train_batch_size", "2",
            "--max_train_steps", "2", "--validation_steps", "0", "--validation_prompts", "a dog",
            "--num_eval_samples", "2", "--num_validation_images", "1", "--report_to", "none", "--rank", "2",
            "--output_dir", str(out), "--adam_epsilon", "1.0", "--learning_rate", "1.0", *extra,  # gradient values
        ])
        assert status == 0
        weights.append(load_file(str(out / "pytorch_lora_weights.safetensors")))
    printed = capsys.readouterr().out
    assert "prompt cache: 3 prompts encoded once" in printed and "text encoders freed" in printed
    assert (tmp_path / "cache").is_dir()
    plain, cached = weights
    assert plain.keys() == cached.keys()
    diff = max(float((plain[k] - cached[k]).abs().max()) for k in plain)
    assert diff <= 1e-6
    assert max(float(v.abs().max()) for k, v in cached.items() if "lora_B" in k) > 0  # it trained
