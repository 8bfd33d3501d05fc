"""Evaluate a base pipeline and its LoRA adapters: rewards, within-prompt diversity, and Recall /
Coverage of each adapter's samples against the base model's.

    python -m diffusers_am.evaluate \\
        --pretrained <pipeline folder, Hub id or short name>   # default: the embedded digits base
        --adapters out/run1 out/run2 --prompts "a cat" "a dog" --num_images_per_prompt 6 \\
        --rewards hpsv2 pickscore --output_dir eval

Every model sees the same initial noise per (prompt, image index), so differences come from the
adapters. Pipelines with a model adapter (``diffusers_am.models.ADAPTERS``) sample through it
(Euler in paper time, the trainer's sampler); any other diffusers pipeline through its own
``__call__`` (``--sampler pipeline``). LoRAs load with ``load_lora_weights`` and unload after.
Writes ``metrics.json``, ``metrics.md``, ``plot_*.png``, ``reward_vs_diversity.png`` and
``samples_<model>.png`` to ``output_dir``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import types
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .errors import BUG_LINE, UserError
from .checks import finite_float, int_at_least
from .deprecation import resolve_dtype, warn_deprecated
from .metrics import extract_features, recall_coverage, within_prompt_diversity
from .metrics.diversity import resolve_diversity
from .metrics.features import load_feature_extractor
from .metrics.report import markdown_table, write_report
from .models import (
    ADAPTERS,
    EMBEDDED_DIGITS_BASE,
    load_model_adapter,
    pipeline_defaults,
    read_model_index,
    resolve_pretrained,
    short_names_help,
)
from .models.base import FlowModelAdapter
from .prompts import _as_condition, load_prompts
from .rewards import evaluation_rewards, load_reward
from .rewards.scoring import score_rewards
from .sampling import sample_images


# -- sampling ----------------------------------------------------------------------------------
class AdapterSampler:
    """Samples through a :class:`FlowModelAdapter` (Euler in paper time, shared initial noise)."""

    def __init__(self, adapter: FlowModelAdapter, *, num_inference_steps: int | None, resolution: int | None,
                 guidance_scale: float | None):
        self.adapter = adapter
        self.pipeline = adapter.pipeline
        self.resolution = resolution or adapter.default_resolution
        self.steps = num_inference_steps or adapter.default_num_inference_steps
        self.guidance_scale = guidance_scale
        self.conditioning = adapter.conditioning

    def noise(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed)
        return self.adapter.initial_noise(n, self.resolution, g)

    @torch.no_grad()
    def sample(self, conditions: Sequence[Any], noise: torch.Tensor, seed: int) -> torch.Tensor:
        times = self.adapter.time_grid(self.steps, self.resolution)
        _, images = sample_images(
            self.adapter, list(conditions), noise, times, guidance_scale=self.guidance_scale,
            chunk_size=max(1, len(conditions)),
        )
        return images.cpu()


class PipelineSampler:
    """Samples with the pipeline's own ``__call__`` (``output_type="pt"``), one seeded generator per batch."""

    def __init__(self, pipeline: Any, *, num_inference_steps: int | None, resolution: int | None, guidance_scale: float | None,
                 call_kwargs: dict[str, Any] | None = None):
        self.pipeline = pipeline
        self.call_kwargs = dict(call_kwargs or {})
        self.steps, self.resolution, self.guidance_scale = num_inference_steps, resolution, guidance_scale
        self.conditioning = "text"

    def noise(self, n: int, seed: int) -> torch.Tensor:
        return torch.full((n,), seed, dtype=torch.long)  # the batch's generator seed stands in for the noise

    @torch.no_grad()
    def sample(self, conditions: Sequence[Any], noise: torch.Tensor, seed: int) -> torch.Tensor:
        kwargs: dict[str, Any] = {**self.call_kwargs, "prompt": list(conditions), "output_type": "pt",
                                  "generator": torch.Generator(device="cpu").manual_seed(seed)}
        if self.steps:
            kwargs["num_inference_steps"] = self.steps
        if self.resolution:
            kwargs["height"] = kwargs["width"] = self.resolution
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        images = self.pipeline(**kwargs).images
        images = torch.as_tensor(images)
        if images.dim() == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.permute(0, 3, 1, 2)
        return images.float().clamp(0, 1).cpu()


def build_sampler(pipeline_or_path: Any, *, sampler: str = "auto", dtype: torch.dtype | None = None,
                  torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None, num_inference_steps: int | None = None,
                  resolution: int | None = None, guidance_scale: float | None = None,
                  pipeline_call_kwargs: dict[str, Any] | None = None, adapter_kwargs: dict[str, Any] | None = None):
    """An AdapterSampler when the pipeline family has a model adapter (or ``sampler="adapter"``),
    else a PipelineSampler over the pipeline's ``__call__``."""
    if sampler not in ("auto", "adapter", "pipeline"):
        raise UserError(f"`sampler` must be 'auto', 'adapter' or 'pipeline'; got {sampler!r}.")
    dtype = resolve_dtype(dtype, torch_dtype, torch.float32)
    kw = dict(num_inference_steps=num_inference_steps, resolution=resolution, guidance_scale=guidance_scale)
    if isinstance(pipeline_or_path, FlowModelAdapter):
        adapter = pipeline_or_path
    elif isinstance(pipeline_or_path, (str, os.PathLike)):
        pipeline_or_path = resolve_pretrained(pipeline_or_path)  # short names -> Hub ids
        cls_name = read_model_index(pipeline_or_path).get("_class_name")
        if sampler == "pipeline" or (sampler == "auto" and cls_name not in ADAPTERS):
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(str(pipeline_or_path), dtype=dtype)
            pipe.set_progress_bar_config(disable=True)
            return PipelineSampler(pipe.to(device) if device else pipe, call_kwargs=pipeline_call_kwargs, **kw)
        adapter = load_model_adapter(pipeline_or_path, dtype=dtype, **(adapter_kwargs or {}))
    else:  # a loaded diffusers pipeline
        cls_name = type(pipeline_or_path).__name__
        if sampler == "pipeline" or (sampler == "auto" and cls_name not in ADAPTERS):
            return PipelineSampler(pipeline_or_path, call_kwargs=pipeline_call_kwargs, **kw)
        from .models import adapter_class

        adapter = adapter_class(cls_name)(pipeline_or_path)
    if device is not None:
        adapter.to(device)
    return AdapterSampler(adapter, **kw)


# -- inputs ------------------------------------------------------------------------------------
def read_prompts(prompts: str | os.PathLike | Sequence[Any] | None, sampler: Any) -> list[Any]:
    """Prompts (or class labels) as a list: a list passes through; a file is read by
    :func:`diffusers_am.prompts.load_prompts` (the trainer's loader: .txt one prompt a line with ``#`` lines
    skipped, .csv, .jsonl); None gives every class of a class-conditional model."""
    if prompts is None:
        num_classes = getattr(sampler.pipeline, "num_classes", None)
        if sampler.conditioning == "class" and num_classes:
            return list(range(int(num_classes)))
        raise UserError("`prompts` is required for a text-to-image pipeline: pass a list or a .txt file (one prompt a line).")
    if isinstance(prompts, (str, os.PathLike)) and Path(prompts).is_file():
        prompts = load_prompts(prompts, conditioning=sampler.conditioning)
    elif isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise UserError("`prompts` is empty.")
    return [_as_condition(p, sampler.conditioning, f"`--prompts` entry {i + 1}") for i, p in enumerate(prompts)]


def _is_digits_base(path: Any) -> bool:
    try:
        return Path(str(path)).resolve() == Path(EMBEDDED_DIGITS_BASE).resolve()
    except (OSError, TypeError):
        return False


LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
"""The diffusers LoRA file names an adapter folder is searched for (never any other weight file in it)."""


def resolve_adapter(adapter: str | os.PathLike) -> tuple[str, str]:
    """(folder, weight file name) of an adapter: a folder holding ``pytorch_lora_weights.safetensors`` (or
    ``.bin``), or a ``.safetensors`` file. ValueError naming the path otherwise."""
    path = Path(adapter)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"adapter {str(path)!r} is not a .safetensors LoRA file; pass the run's output folder.")
        return str(path.parent), path.name
    if not path.is_dir():
        raise UserError(
            f"adapter {str(path)!r} does not exist: pass folders holding pytorch_lora_weights.safetensors."
        )
    for name in LORA_FILE_NAMES:
        if (path / name).is_file():
            return str(path), name
    raise UserError(
        f"adapter folder {str(path)!r} holds no {LORA_FILE_NAMES[0]} (the file the trainer writes); pass a "
        "training run's output folder, or the adapter's .safetensors file."
    )


def read_adapter_weights(folder: str, weight_name: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file, checked before anything is sampled: a readable, complete
    safetensors (or weights-only torch) file of finite floating-point LoRA tensors. ValueError naming the file."""
    path = Path(folder) / weight_name
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors' SafetensorError, an unpickling error, OSError
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(
            f"adapter file {str(path)!r} is not a readable LoRA weight file ({detail}): it is damaged, truncated or "
            "not a safetensors file; pass the pytorch_lora_weights.safetensors a training run wrote."
        ) from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"adapter file {str(path)!r} holds no tensors; pass a LoRA adapter file.")
    if not any("lora" in key.lower() for key in state):
        raise UserError(
            f"adapter file {str(path)!r} holds no LoRA weights (keys such as {sorted(state)[:2]}); pass a LoRA "
            "adapter (keys '<module>.lora_A.weight' / '.lora_B.weight')."
        )
    for key, value in state.items():
        if not value.is_floating_point():
            raise UserError(
                f"adapter file {str(path)!r}: tensor {key!r} is {value.dtype}; LoRA weights are floating point "
                "(float32, float16 or bfloat16)."
            )
        if not torch.isfinite(value).all():
            raise UserError(f"adapter file {str(path)!r}: tensor {key!r} holds NaN or inf values.")
    return state


def check_adapter_fits(state: dict[str, torch.Tensor], pipeline: Any, path: str) -> None:
    """ValueError naming ``path`` unless each PEFT-format LoRA pair ``<component>.<module>.lora_A/B.weight`` of
    ``state`` names a module of ``pipeline``'s component with matching shapes: lora_A [r, in_features],
    lora_B [out_features, r] for a Linear. Keys in other LoRA formats are left to diffusers' converters."""
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        prefix = key[: -len(".lora_A.weight")]
        component, _, module_path = prefix.partition(".")
        model = getattr(pipeline, component, None)
        if not isinstance(model, torch.nn.Module):
            raise UserError(
                f"adapter file {path!r}: key {key!r} is for a {component!r} this pipeline "
                f"({type(pipeline).__name__}) does not have; pass an adapter trained on this model."
            )
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise UserError(
                f"adapter file {path!r}: key {key!r} names no module of this model's {component}; pass an adapter "
                f"trained on this model ({type(pipeline).__name__})."
            ) from None
        up = state.get(f"{prefix}.lora_B.weight")
        if up is None:
            raise UserError(f"adapter file {path!r}: {key!r} has no matching {prefix}.lora_B.weight.")
        base = getattr(module, "base_layer", module)
        if isinstance(base, torch.nn.Linear):
            want_a, want_b = (down.shape[0], base.in_features), (base.out_features, down.shape[0])
            if down.dim() != 2 or up.dim() != 2 or tuple(down.shape) != want_a or tuple(up.shape) != want_b:
                raise UserError(
                    f"adapter file {path!r}: {prefix} has shapes lora_A {list(down.shape)}, lora_B {list(up.shape)}; "
                    f"this model's layer ({base.in_features} -> {base.out_features}) needs [r, {base.in_features}] and "
                    f"[{base.out_features}, r]: pass an adapter trained on this model."
                )


def _check_arguments(num_images_per_prompt: int, batch_size: int, k: int, seed: int, num_inference_steps: int | None,
                     resolution: int | None, guidance_scale: float | None, device: Any) -> None:
    """ValueError naming the first bad argument of :func:`evaluate` (before any model is loaded)."""
    for name, value, minimum in (("num_images_per_prompt", num_images_per_prompt, 1), ("batch_size", batch_size, 1),
                                 ("k", k, 1), ("seed", seed, 0), ("num_inference_steps", num_inference_steps, 1),
                                 ("resolution", resolution, 1)):
        if value is None and name in ("num_inference_steps", "resolution"):
            continue
        int_at_least(value, name, minimum)
    if guidance_scale is not None:
        finite_float(guidance_scale, "guidance_scale")
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise UserError(f"`device` {device!r} is not a torch device ({err}); e.g. cpu, cuda, cuda:1.") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"`device` {device!r}: CUDA is not available here; pass `--device cpu`.")


def peft_adapter_name(name: str) -> str:
    """``name`` as a PEFT adapter name: PEFT stores adapters as torch submodules, whose names cannot
    contain '.', so every '.' becomes '_' (the report keeps ``name``)."""
    return name.replace(".", "_")


def _adapter_names(adapters: Sequence[str | os.PathLike]) -> list[str]:
    names: list[str] = []
    for a in adapters:
        p = Path(a)
        base = (p.parent.name if p.is_file() else p.name) or "adapter"
        name, i = base, 2
        while name in names or name == "base":
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


# -- evaluation --------------------------------------------------------------------------------
def evaluate(
    pipeline_or_path: Any = EMBEDDED_DIGITS_BASE,
    adapters: Sequence[str | os.PathLike] = (),
    prompts: str | os.PathLike | Sequence[Any] | None = None,
    num_images_per_prompt: int = 6,
    rewards: Sequence[str] | None = None,
    reward_model_paths: dict[str, str] | None = None,
    feature_extractor: str | Callable | None = None,
    diversity: str | Sequence[str] | None = "auto",
    output_dir: str | os.PathLike | None = "eval",
    *,
    num_inference_steps: int | None = None,
    resolution: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    k: int = 5,
    sampler: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    pipeline_call_kwargs: dict[str, Any] | None = None,
    adapter_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    torch_dtype: torch.dtype | None = None,
    reward_paths: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Generate with the base model and each adapter, then measure; returns the results dict (see
    :mod:`diffusers_am.metrics.report`) and writes the report when ``output_dir`` is set.

    Defaults on the digits base: rewards ``digits`` and ``digits-heldout``, features of the held-out
    digits classifier, diversity 1 - SSIM and feature distance. On text pipelines: the paper's five
    rewards, CLIP ViT-L/14 features, LPIPS and 1 - MS-SSIM (images above 160 px).
    ``pipeline_call_kwargs``: extra arguments for the pipeline's ``__call__`` (``sampler="pipeline"``);
    ``adapter_kwargs``: for the model adapter's ``from_pretrained`` (e.g. ``max_sequence_length``).
    ``dtype``: weights' dtype (default fp32). Deprecated spellings: ``torch_dtype`` (for ``dtype``) and
    ``reward_paths`` (for ``reward_model_paths``), each with a FutureWarning."""
    dtype = resolve_dtype(dtype, torch_dtype, torch.float32)
    if isinstance(pipeline_or_path, (str, os.PathLike)):  # a folder's diffusers_am_defaults.json ("evaluate")
        defaults = pipeline_defaults(pipeline_or_path, "evaluate")
        prompts = defaults.get("prompts") if prompts is None else prompts
        rewards = defaults.get("rewards") if rewards is None else rewards
        feature_extractor = defaults.get("feature_extractor") if feature_extractor is None else feature_extractor
        num_inference_steps = defaults.get("num_inference_steps") if num_inference_steps is None else num_inference_steps
        resolution = defaults.get("resolution") if resolution is None else resolution
        guidance_scale = defaults.get("guidance_scale") if guidance_scale is None else guidance_scale
        if defaults.get("max_sequence_length") is not None:
            seq = {"max_sequence_length": defaults["max_sequence_length"]}
            pipeline_call_kwargs = {**seq, **(pipeline_call_kwargs or {})}
            adapter_kwargs = {**seq, **(adapter_kwargs or {})}
    if reward_paths is not None:
        if reward_model_paths is not None:
            raise UserError("pass either `reward_model_paths` or `reward_paths` (deprecated), not both.")
        warn_deprecated("reward_paths", "reward_model_paths")
        reward_model_paths = reward_paths
    _check_arguments(
        num_images_per_prompt, batch_size, k, seed, num_inference_steps, resolution, guidance_scale, device
    )
    lora_files = [resolve_adapter(a) for a in adapters]
    lora_states = [read_adapter_weights(folder_, name) for folder_, name in lora_files]
    folder = None
    if output_dir is not None:  # claimed (checked and locked) before anything is loaded
        from .training.run_folder import RunFolder

        folder = RunFolder.claim(output_dir, "`--output_dir`")
    try:
        return _evaluate(
            pipeline_or_path, adapters, lora_files, lora_states, prompts, num_images_per_prompt, rewards,
            reward_model_paths, feature_extractor, diversity, folder, num_inference_steps=num_inference_steps,
            resolution=resolution, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, k=k,
            sampler=sampler, device=device, dtype=dtype, pipeline_call_kwargs=pipeline_call_kwargs,
            adapter_kwargs=adapter_kwargs, progress=progress,
        )
    finally:
        if folder is not None:
            folder.release()


def report_names(results: dict[str, Any], samples: dict[str, torch.Tensor]) -> list[str]:
    """The files :func:`~diffusers_am.metrics.report.write_report` writes for ``results`` (recorded in the
    output folder's marker before they are written)."""
    from .metrics.report import metric_columns

    cols = metric_columns(results["models"])
    names = ["metrics.json", "metrics.md", *(f"plot_{c.replace('/', '_')}.png" for c in cols)]
    if any(c.startswith("reward/") for c in cols) and any(c.startswith("diversity/") for c in cols):
        names.append("reward_vs_diversity.png")
    return names + [f"samples_{name}.png" for name in samples]


def _evaluate(
    pipeline_or_path: Any, adapters: Sequence[str | os.PathLike], lora_files: list[tuple[str, str]],
    lora_states: list[dict[str, torch.Tensor]], prompts: Any,
    num_images_per_prompt: int, rewards: Sequence[str] | None, reward_model_paths: dict[str, str] | None,
    feature_extractor: str | Callable | None, diversity: str | Sequence[str] | None, folder: Any, *,
    num_inference_steps: int | None, resolution: int | None, guidance_scale: float | None, seed: int,
    batch_size: int, k: int, sampler: str, device: Any, dtype: torch.dtype, pipeline_call_kwargs: Any,
    adapter_kwargs: Any, progress: bool,
) -> dict[str, Any]:
    """:func:`evaluate` once its arguments and adapter files (``lora_states``) are checked and ``folder`` (a
    RunFolder, or None: no report) is claimed."""
    smp = build_sampler(pipeline_or_path, sampler=sampler, dtype=dtype, device=device,
                        num_inference_steps=num_inference_steps, resolution=resolution, guidance_scale=guidance_scale,
                        pipeline_call_kwargs=pipeline_call_kwargs, adapter_kwargs=adapter_kwargs)
    for (folder_, name), state in zip(lora_files, lora_states):
        check_adapter_fits(state, smp.pipeline, str(Path(folder_) / name))
    del lora_states
    prompt_list = read_prompts(prompts, smp)
    conditions = [p for p in prompt_list for _ in range(num_images_per_prompt)]
    n = len(conditions)
    if adapters and n <= k:
        raise UserError(f"Recall/Coverage with k = {k} need more than {k} images per model; got {n}: raise num_images_per_prompt or add prompts.")
    digits = _is_digits_base(pipeline_or_path)
    if rewards is None:
        rewards = evaluation_rewards("digits" if digits else smp.conditioning)
    if feature_extractor is None:
        feature_extractor = "digits-heldout" if digits else "clip"
    reward_fns = {spec: load_reward(spec, device=device, paths=reward_model_paths) for spec in rewards}
    features = load_feature_extractor(feature_extractor, device=device)

    # generation: shared noise per (condition, image index) across models
    names = ["base"] + _adapter_names(adapters)
    chunks = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    noise = smp.noise(n, seed)
    samples: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(names) * len(chunks), desc="generating", disable=not progress)
    for name, lora in zip(names, [None, *lora_files]):
        if lora is not None:
            smp.pipeline.load_lora_weights(lora[0], weight_name=lora[1], adapter_name=peft_adapter_name(name))
        try:
            imgs = []
            for ci, (s, e) in enumerate(chunks):
                imgs.append(smp.sample(conditions[s:e], noise[s:e], seed + ci))
                bar.update(1)
            samples[name] = torch.cat(imgs)
        finally:
            if lora is not None:
                smp.pipeline.unload_lora_weights()
    bar.close()

    # metrics
    div_fns = resolve_diversity(diversity, min(samples["base"].shape[-2:]), features)
    base_feats = extract_features(features, samples["base"], batch_size)
    models: dict[str, dict[str, float]] = {}
    for name in tqdm(names, desc="measuring", disable=not progress):
        imgs, m = samples[name], {}
        for spec, fn in reward_fns.items():
            for key, r in score_rewards(fn, imgs, conditions, batch_size=batch_size, name=spec).items():
                m[f"reward/{key}"] = r.mean().item()  # a weighted spec adds reward/<spec>/<component>
                m[f"reward/{key}/sem"] = (r.std(unbiased=True) / n**0.5).item() if n > 1 else 0.0
        if num_images_per_prompt >= 2:
            for d, fn in div_fns.items():
                m[f"diversity/{d}"] = within_prompt_diversity(imgs, conditions, fn)
        if name != "base" and n > k:
            m.update(recall_coverage(base_feats, extract_features(features, imgs, batch_size), k=k))
        models[name] = m
    results = {
        "config": {
            "pipeline": str(pipeline_or_path) if isinstance(pipeline_or_path, (str, os.PathLike)) else type(pipeline_or_path).__name__,
            "adapters": dict(zip(names[1:], [str(a) for a in adapters])),
            "prompts": [p if isinstance(p, (int, str)) else str(p) for p in prompt_list],
            "num_images_per_prompt": num_images_per_prompt, "rewards": list(rewards),
            "feature_extractor": feature_extractor if isinstance(feature_extractor, str) else getattr(feature_extractor, "__name__", "callable"),
            "diversity": list(div_fns), "k": k, "seed": seed, "sampler": type(smp).__name__,
            "num_inference_steps": getattr(smp, "steps", None), "resolution": getattr(smp, "resolution", None),
            "guidance_scale": guidance_scale, "ms_ssim_implementation": "pytorch-msssim",
        },
        "models": models,
    }
    if folder is not None:
        folder.start(report_names(results, samples), fresh=False)  # refuses to replace a file it did not write
        written = write_report(results, folder.path, samples, nrow=num_images_per_prompt)
        folder.record(*(path.name for path in written.values()))
        results["files"] = {k_: str(v) for k_, v in written.items()}
    return results


# -- CLI ---------------------------------------------------------------------------------------
def _parse_paths(items: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"`--reward_model_paths` entries are NAME=PATH (e.g. hpsv2=/ckpt/HPS_v2_compressed.pt); got {item!r}.")
        out[name] = path
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from .training.config import OneLineErrorParser

    p = OneLineErrorParser(prog="python -m diffusers_am.evaluate", description=__doc__.split("\n\n")[0],
                           allow_abbrev=False)
    p.add_argument("--pretrained_model_name_or_path", "--pretrained", default=str(EMBEDDED_DIGITS_BASE),
                   help=f"pipeline folder, Hub id or short name: {short_names_help()} "
                   "(default: the embedded digits base)")
    p.add_argument("--adapters", nargs="*", default=[], help="LoRA folders (pytorch_lora_weights.safetensors) to compare with the base")
    p.add_argument("--prompts", nargs="*", default=None, help="prompts (or class labels), or one .txt file with a prompt a line (default: every class of a class-conditional model)")
    p.add_argument("--num_images_per_prompt", type=int, default=6)
    p.add_argument("--rewards", nargs="*", default=None, help=f"reward names/specs (default: {' '.join(evaluation_rewards('digits'))} on the digits base, "
                   f"{' '.join(evaluation_rewards('text'))} on text pipelines)")
    p.add_argument("--reward_model_paths", nargs="*", default=None, metavar="NAME=PATH",
                   help="local checkpoint (file, folder or Hub id) per reward (the trainer's flag)")
    p.add_argument("--reward_paths", nargs="*", default=None, metavar="NAME=PATH",
                   help="deprecated spelling of --reward_model_paths")
    p.add_argument("--feature_extractor", default=None, help="'clip', 'clip:<folder>', 'digits', 'digits-heldout' or 'module:callable'")
    p.add_argument("--diversity", default="auto", help="comma list of lpips, ms_ssim, ssim, feature_distance (default: by image size)")
    p.add_argument("--output_dir", default="eval")
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--k", type=int, default=5, help="nearest neighbours for Recall / Coverage")
    p.add_argument("--sampler", choices=["auto", "adapter", "pipeline"], default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--max_sequence_length", type=int, default=None, help="prompt tokens for text pipelines (default: the pipeline's)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: prints the table and where the report went; returns the exit code (2 and one ``error:``
    line for a bad argument, nothing written)."""
    import sys

    args = parse_args(argv)
    if args.reward_paths is not None:
        warn_deprecated("--reward_paths", "--reward_model_paths")
        if args.reward_model_paths is not None:
            print("error: pass either --reward_model_paths or --reward_paths (deprecated), not both.", file=sys.stderr)
            return 2
        args.reward_model_paths = args.reward_paths
    prompts: Any = args.prompts
    if prompts is not None and len(prompts) == 1 and Path(prompts[0]).is_file():
        prompts = prompts[0]
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    seq = {} if args.max_sequence_length is None else {"max_sequence_length": args.max_sequence_length}
    from .bnb import bitsandbytes_deferred, pipeline_needs_bitsandbytes

    try:
        with bitsandbytes_deferred(not pipeline_needs_bitsandbytes(args.pretrained_model_name_or_path)):
            results = evaluate(
                args.pretrained_model_name_or_path, args.adapters, prompts, args.num_images_per_prompt,
                args.rewards, _parse_paths(args.reward_model_paths), args.feature_extractor, args.diversity, args.output_dir,
                num_inference_steps=args.num_inference_steps, resolution=args.resolution,
                guidance_scale=args.guidance_scale, seed=args.seed, batch_size=args.batch_size, k=args.k,
                sampler=args.sampler, device=args.device, dtype=dtype, pipeline_call_kwargs=seq, adapter_kwargs=seq,
            )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except Exception:  # a bug, ours or a library's: its traceback, and where to report it
        traceback.print_exc()
        print(BUG_LINE, file=sys.stderr)
        return 1
    print(markdown_table(results))
    print(f"wrote {results['files']['json']} and {results['files']['markdown']}")
    return 0


class _CallableModule(types.ModuleType):
    """Importing this module binds ``diffusers_am.evaluate`` to it (over the lazy top-level export of the
    function of the same name): calling it calls :func:`evaluate`, so ``diffusers_am.evaluate(...)`` works
    either way."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return evaluate(*args, **kwargs)


if __name__ != "__main__":
    sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    raise SystemExit(main())

