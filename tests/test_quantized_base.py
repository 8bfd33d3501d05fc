"""``--quantize_base nf4 | int8``: a bitsandbytes-quantized frozen base under an fp32 LoRA (QLoRA style).

The reference for every check is the stock pipeline whose quantized weights are replaced by their dequantized
values, computed here with bitsandbytes' functional API (``quantize_4bit`` / ``dequantize_4bit`` with its
defaults, blocksize 64 and no double quantization; ``int8_vectorwise_quant`` for int8) on the stock loaded
weights: nothing of diffusers_am's quantization path. NF4 layers on the CPU dequantize their weight to the
compute dtype (fp32 here) and call the same linear, so a run on the NF4 base and a run on the dequantized base
do the same arithmetic: the adapters agree to fp32 rounding (measured 0 on these tiny models; asserted within
1e-6). int8 layers rescale the int8 weight row by row inside the matmul, a different rounding of the same
weights: asserted within 1e-4 (measured differences are printed, `pytest -s`).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from _tiny_pipelines import TINY_RESOLUTION as RES
from _run_helpers import max_abs_difference
from _run_helpers import trained_adapter as train
from _tiny_pipelines import save_tiny_flux, save_tiny_flux2_klein, save_tiny_sd3
from _run_helpers import _fresh_accelerate_state  # noqa: F401  (fixture)
from safetensors.torch import load_file

from diffusers_am.models import LoraSettings, load_model_adapter
from diffusers_am.train import main

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.nn.modules  # noqa: E402, F401  (used as bnb.nn.modules)

bnb.nn.modules.has_avx512bf16 = lambda: False  # its CPU repacking fails on 32-wide layers: tests/_bnb_cpu/sitecustomize.py

TINY_REWARD = f"{Path(__file__).resolve().parent / '_tiny_pipelines.py'}:mean_brightness"
PROMPTS = ["a red cat", "a dog"]
NF4_TOL = 1e-6
INT8_TOL = 1e-4
VALUES = ["--adam_epsilon", "1.0", "--learning_rate", "100"]
"""Adam's first steps are about lr * sign(g) at the default epsilon; with a large one the step is lr * g / (|g| +
eps), so the compared adapters differ where the gradients' values differ, not only their signs. The tiny klein's
gradients are about 1e-3 (lr 1 moves LoRA B by at most 3e-3 in 2 updates; the step is lr * g within 1%): lr 100
moves it by up to about 0.2 (measured 0.24), so that a 1% error of the gradient moves it by about 1e-3, beyond
NF4_TOL and INT8_TOL."""
FAMILIES = {"flux2-klein": save_tiny_flux2_klein, "flux1": save_tiny_flux, "sd3": save_tiny_sd3}


# -- the reference: the stock pipeline with its weights replaced by the dequantized ones --------------------------
def _dequantized(weight: torch.Tensor, mode: str) -> torch.Tensor:
    import bitsandbytes.functional as F

    if mode == "nf4":
        packed, state = F.quantize_4bit(weight.contiguous(), blocksize=64, compress_statistics=False, quant_type="nf4")
        return F.dequantize_4bit(packed, state).to(weight.dtype)
    rows, scales, _ = F.int8_vectorwise_quant(weight.half().contiguous())  # Int8Params quantizes the fp16 weight
    return (rows.float() * scales.float().view(-1, 1) / 127).to(weight.dtype)


def dequantized_base(base: Path, out: Path, mode: str = "nf4", components=("transformer", "text_encoder")) -> Path:
    """The pipeline at ``base`` with the weights of every ``nn.Linear`` of ``components`` (text encoders: all
    but the output head and the model's fp32-kept modules) replaced by their ``mode`` values dequantized."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base)
    for name in components:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        keep = list(getattr(module, "_keep_in_fp32_modules", None) or [])
        keep += ["lm_head"] if name != "transformer" else []
        with torch.no_grad():
            for layer_name, layer in module.named_modules():
                parts = layer_name.split(".")
                if type(layer) is torch.nn.Linear and not any(k in parts for k in keep):
                    layer.weight.copy_(_dequantized(layer.weight, mode))
    pipe.save_pretrained(out)
    return out


def _text_encoders(base: Path) -> tuple[str, ...]:
    index = json.loads((base / "model_index.json").read_text())
    return tuple(sorted(n for n in index if n.startswith("text_encoder")))


# -- runs -----------------------------------------------------------------------------------------------------
def _args(base: Path, prompts: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(base), "--resolution", str(RES), "--num_inference_steps", "3",
        "--truncate_steps", "2", "--prompts", str(prompts), "--train_batch_size", "2", "--max_train_steps", "2",
        "--num_eval_samples", "0", "--num_validation_images", "1", "--validation_prompts", "a dog",
        "--validation_steps", "0", "--report_to", "none", "--rank", "2", "--cpu_threads", "1",
        "--reward", TINY_REWARD, *VALUES, *extra,
    ]




@pytest.fixture(scope="module")
def klein(tmp_path_factory) -> dict[str, Path]:
    """Tiny klein, its NF4-dequantized twin (transformer and text encoder) and a prompts file."""
    root = tmp_path_factory.mktemp("klein")
    base = save_tiny_flux2_klein(root / "base")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"base": base, "nf4": dequantized_base(base, root / "nf4-dequantized"), "prompts": prompts}


# -- every method, 2 updates: NF4 base == the dequantized base -------------------------------------------------
@pytest.mark.parametrize("method", ["ode-am", "sde-am", "draft", "refl"])
def test_nf4_base_trains_the_adapter_of_its_dequantized_base(method, klein, tmp_path):
    quantized = train(tmp_path / "nf4", *_args(klein["base"], klein["prompts"], "--method", method,
                                               "--quantize_base", "nf4"))
    reference = train(tmp_path / "ref", *_args(klein["nf4"], klein["prompts"], "--method", method))
    difference = max_abs_difference(quantized, reference)
    print(f"\ntiny klein, {method}, 2 updates: NF4 base vs dequantized base, max abs difference {difference:.3g}")
    assert difference <= NF4_TOL
    if method == "ode-am":  # the quantization is real: the unquantized base trains another adapter
        original = train(tmp_path / "orig", *_args(klein["base"], klein["prompts"], "--method", method))
        assert max_abs_difference(quantized, original) > 100 * NF4_TOL
    config = json.loads((tmp_path / "nf4" / "training_config.json").read_text())
    assert config["quantize_base"] == "nf4"
    card = (tmp_path / "nf4" / "README.md").read_text()
    assert "| base weights quantized (trained against) | text_encoder nf4, transformer nf4 |" in card
    assert "| base weights quantized (trained against) | none |" in (tmp_path / "ref" / "README.md").read_text()


def test_nf4_with_checkpointing_micro_batches_prompt_cache_ema_and_8bit_adam(klein, tmp_path):
    """Every memory option together on the NF4 base (the text encoder is cached, so only the transformer is
    quantized): the adapter of the dequantized base with the same options."""
    root = tmp_path
    reference_base = dequantized_base(klein["base"], root / "nf4-transformer", components=("transformer",))
    extra = ["--gradient_checkpointing", "--micro_batch_size", "1", "--cache_prompt_embeddings", "--use_ema",
             "--ema_decay", "0.5", "--use_8bit_adam", "--gradient_accumulation_steps", "2"]
    quantized = train(root / "nf4", *_args(klein["base"], klein["prompts"], "--quantize_base", "nf4", *extra))
    reference = train(root / "ref", *_args(reference_base, klein["prompts"], *extra))
    difference = max_abs_difference(quantized, reference)
    print(f"\ntiny klein, ode-am, all memory options, 2 updates: NF4 vs dequantized, max abs {difference:.3g}")
    assert difference <= NF4_TOL
    card = (root / "nf4" / "README.md").read_text()
    assert "| base weights quantized (trained against) | transformer nf4 |" in card  # text encoder cached, freed


def test_int8_base_trains_close_to_its_dequantized_base(klein, tmp_path):
    reference_base = dequantized_base(klein["base"], tmp_path / "int8-dequantized", mode="int8")
    quantized = train(tmp_path / "int8", *_args(klein["base"], klein["prompts"], "--quantize_base", "int8"))
    reference = train(tmp_path / "ref", *_args(reference_base, klein["prompts"]))
    difference = max_abs_difference(quantized, reference)
    print(f"\ntiny klein, ode-am, 2 updates: int8 base vs dequantized base, max abs difference {difference:.3g}")
    assert difference <= INT8_TOL
    assert json.loads((tmp_path / "int8" / "training_config.json").read_text())["quantize_base"] == "int8"


# -- the base VJP through the quantized layers == autograd through the dequantized model ------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_base_vjp_through_nf4_layers_is_autograd_through_the_dequantized_model(family, tmp_path):
    from diffusers_am.models.quantize import quantization_of

    base = FAMILIES[family](tmp_path / "base")
    components = ("transformer",) + _text_encoders(base)
    reference = load_model_adapter(dequantized_base(base, tmp_path / "ref", components=components))
    adapter = load_model_adapter(base, quantize_base="nf4")
    assert quantization_of(adapter.transformer) == "nf4"
    assert not any(type(m) is torch.nn.Linear for m in adapter.transformer.modules())  # every Linear is NF4
    params = adapter.add_lora(LoraSettings(rank=2, init_lora_weights=False))  # B != 0: the LoRA acts when on
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    encoded, encoded_ref = adapter.encode_conditions(PROMPTS), reference.encode_conditions(PROMPTS)
    torch.testing.assert_close(encoded.prompt_embeds, encoded_ref.prompt_embeds, rtol=0, atol=1e-6)
    gen = torch.Generator().manual_seed(3)
    x = adapter.initial_noise(2, RES, gen)
    t, cotangent = torch.tensor(0.4), torch.randn(x.shape, generator=gen)
    value, jt = adapter.flow(encoded).base_vjp(x, t, cotangent)
    xr = x.clone().requires_grad_(True)
    v_ref = reference.flow(encoded_ref).velocity(xr, t)
    (jt_ref,) = torch.autograd.grad(v_ref, xr, cotangent)
    difference = float((jt - jt_ref).abs().max())
    print(f"\ntiny {family}: base VJP through NF4 vs autograd through dequantized, max abs {difference:.3g}")
    torch.testing.assert_close(value, v_ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(jt, jt_ref, rtol=0, atol=1e-6)
    assert not torch.allclose(adapter.flow(encoded).velocity(x, t), value)  # the LoRA is back on after the VJP


# -- the adapter loads into a stock pipeline, unquantized or quantized ---------------------------------------------
def test_nf4_adapter_loads_into_stock_and_quantized_pipelines(klein, tmp_path):
    from diffusers import Flux2KleinPipeline

    from diffusers_am.models.quantize import quantize_pipeline

    out = tmp_path / "nf4"
    train(out, *_args(klein["base"], klein["prompts"], "--quantize_base", "nf4"))
    call = dict(prompt=PROMPTS, num_inference_steps=3, height=RES, width=RES, output_type="pt", max_sequence_length=32)

    def images(pipe):
        return pipe(generator=torch.Generator().manual_seed(0), **call).images

    stock = Flux2KleinPipeline.from_pretrained(klein["base"])  # unquantized, original weights
    before = images(stock)
    stock.load_lora_weights(str(out))
    assert (images(stock) - before).abs().max() > 1e-4
    dequantized = Flux2KleinPipeline.from_pretrained(klein["nf4"])
    dequantized.load_lora_weights(str(out))
    quantized = Flux2KleinPipeline.from_pretrained(klein["base"])
    quantize_pipeline(quantized, "nf4", torch.float32, ["transformer", "text_encoder"])
    quantized.load_lora_weights(str(out))
    assert type(quantized.transformer.transformer_blocks[0].attn.to_q.base_layer) is bnb.nn.Linear4bit
    torch.testing.assert_close(images(quantized), images(dequantized), rtol=0, atol=1e-5)


def test_a_passed_quantized_pipeline_is_used_as_it_is(klein, tmp_path):
    from diffusers import Flux2KleinPipeline

    from _tiny_pipelines import mean_brightness

    from diffusers_am.models.quantize import quantize_pipeline
    from diffusers_am.training import AdjointMatchingTrainer, TrainingConfig

    pipe = Flux2KleinPipeline.from_pretrained(klein["base"])
    quantize_pipeline(pipe, "nf4", torch.float32, ["transformer", "text_encoder"])
    layers = {id(m) for m in pipe.transformer.modules() if isinstance(m, bnb.nn.Linear4bit)}
    config = TrainingConfig(
        output_dir=str(tmp_path / "passed"), resolution=RES, num_inference_steps=3, truncate_steps=2,
        train_batch_size=2, max_train_steps=2, num_eval_samples=0, num_validation_images=1,
        validation_prompts=["a dog"], validation_steps=0, report_to="none", rank=2, cpu_threads=1,
        learning_rate=100.0, adam_epsilon=1.0, quantize_base="nf4",  # VALUES
    )
    AdjointMatchingTrainer(config, pipeline=pipe, reward=mean_brightness, prompts=PROMPTS).train()
    # the same NF4 layers (not quantized again), now under the LoRA
    assert {id(m) for m in pipe.transformer.modules() if isinstance(m, bnb.nn.Linear4bit)} == layers
    passed = load_file(str(tmp_path / "passed" / "pytorch_lora_weights.safetensors"))
    loaded = train(tmp_path / "loaded", *_args(klein["base"], klein["prompts"], "--quantize_base", "nf4"))
    assert max_abs_difference(passed, loaded) <= NF4_TOL  # the same NF4 base as loading with the flag


# -- unsupported combinations: one line at set-up ----------------------------------------------------------------
def test_sit_base_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--output_dir", str(out), "--quantize_base", "nf4", "--max_train_steps", "1", "--report_to", "none"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "`--quantize_base nf4` applies to the FLUX.2-klein, FLUX.1 and SD3" in err
    assert not out.exists() or not any(out.iterdir())


def test_missing_bitsandbytes_is_one_line(klein, tmp_path, capsys, monkeypatch):
    for name in [n for n in sys.modules if n == "bitsandbytes" or n.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    out = tmp_path / "out"
    assert main(["--output_dir", str(out), *_args(klein["base"], klein["prompts"], "--quantize_base", "int8")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: `--quantize_base int8` needs bitsandbytes: `pip install bitsandbytes` (or `pip install "
        "diffusers-am[bnb]`), or pass `--quantize_base none`."
    )
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_sharding_engines_are_refused_in_one_line(engine):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from diffusers_am.models.quantize import check_engine

    accelerator = SimpleNamespace(distributed_type=getattr(DistributedType, engine))
    with pytest.raises(ValueError, match=r"cannot be sharded: run on one process or with DDP") as info:
        check_engine("nf4", accelerator)
    assert "\n" not in str(info.value)
    check_engine("none", accelerator)  # an unquantized base is not concerned
    check_engine("nf4", SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))  # DDP keeps whole weights


def test_bad_value_is_one_line(capsys):
    # checked by the config (building the parser reads no choices that need torch): exit 2, one line
    assert main(["--quantize_base", "fp8"]) == 2
    err = capsys.readouterr().err
    assert err == "error: `--quantize_base` must be one of none, nf4, int8; got 'fp8'.\n"


# -- multi-process: DDP over the NF4 base -------------------------------------------------------------------------
def test_nf4_base_under_ddp_on_two_processes(klein, tmp_path):
    """2 CPU processes (DDP, gloo) on the NF4 base give the adapter of 1 process with 2 accumulated micro-batches."""
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(root / "tests" / "_bnb_cpu"), str(root)]),
           "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1", "TQDM_DISABLE": "1"}
    flags = _args(klein["base"], klein["prompts"], "--quantize_base", "nf4")
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(root / "train_adjoint_matching.py"), "--output_dir", str(tmp_path / "ddp"), *flags]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "train_summary.json").read_text())["num_processes"] == 2
    ddp = load_file(str(tmp_path / "ddp" / "pytorch_lora_weights.safetensors"))
    single = train(tmp_path / "single", *flags, "--gradient_accumulation_steps", "2")
    difference = max_abs_difference(ddp, single)
    print(f"\ntiny klein, NF4 base, 2 updates: 2 processes (DDP) vs 1 x 2 micro-batches, max abs {difference:.3g}")
    assert difference <= 1e-5


def test_nf4_checkpoint_and_resume_give_the_straight_run(klein, tmp_path):
    """Checkpoints hold the LoRA, not the quantized base: 1 update + checkpoint + resume to 2 == 2 straight."""
    common = _args(klein["base"], klein["prompts"], "--quantize_base", "nf4")
    straight = train(tmp_path / "straight", *common)
    out = tmp_path / "resumed"
    first = [a if a != "2" or common[i - 1] != "--max_train_steps" else "1" for i, a in enumerate(common)]
    from accelerate.state import AcceleratorState

    assert main(["--output_dir", str(out), *first, "--checkpointing_steps", "1"]) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    assert (out / "checkpoint-1").is_dir()
    resumed = train(out, *common, "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest")
    assert max_abs_difference(straight, resumed) <= NF4_TOL
    changed = ["--output_dir", str(out), *common, "--quantize_base", "int8", "--resume_from_checkpoint", "latest"]
    assert main(changed) == 2  # the base's quantization defines the run: it cannot change on resume
