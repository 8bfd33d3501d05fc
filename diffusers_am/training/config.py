"""``TrainingConfig``: every knob of ``train_adjoint_matching.py``, documented in one place.

The command line is built from this dataclass (one ``--flag`` per field, its help text is the
field's ``help``), and a ``--config`` YAML or JSON file may set any field; flags given on the
command line override the file. ``TrainingConfig`` validates itself on construction and raises a
:class:`~diffusers_am.errors.UserError` naming the bad field and the fix.

Building the parser (``--help``) imports no torch: the method registry (:mod:`.methods`) and the control
math are imported when a config is validated.

Objects from Python: what ``AdjointMatchingTrainer`` takes besides the config: a pipeline or model adapter, a reward
callable, a prompt list, a ``peft.LoraConfig`` and callbacks; checked, and recorded honestly in the config.

Objects win over the config's strings. The config the run writes (``training_config.json``, the tracker, the
model card) names what was passed instead of the string it replaced, e.g. reward
``"<callable my_module.my_reward>"`` or pretrained ``"<pipeline object: FluxPipeline>"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..checks import int_at_least, one_of, positive_float
from ..errors import UserError
from ..models import pipeline_defaults, resolve_pretrained, short_names_help

LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear", "cosine_with_restarts", "polynomial")


MIXED_PRECISION = ("no", "fp16", "bf16")


TRACKERS = ("tensorboard", "wandb", "all", "none")


MATCH_STATISTICS = ("none", "velocity", "reward_gain")


SECRET_FIELDS = ("hub_token",)
"""Fields never written to the tracker, the config dump or the model card."""


def method_names() -> tuple[str, ...]:
    """The registered ``--method`` values (:func:`.methods.method_names`; imports torch)."""
    from .methods import method_names as registered

    return registered()


def quantize_choices() -> tuple[str, ...]:
    """The ``--quantize_base`` values (:data:`..models.quantize.QUANTIZE_CHOICES`; that module imports torch)."""
    from ..models.quantize import QUANTIZE_CHOICES

    return QUANTIZE_CHOICES


def sde_schedule_choices() -> tuple[str, ...]:
    """The ``--sde_schedule`` values (:data:`..schedules.SCHEDULES`; that module imports torch)."""
    from ..schedules import SCHEDULES

    return tuple(SCHEDULES)


def _choices(f: dataclasses.Field) -> tuple | None:
    """A field's allowed values: its ``choices`` (a tuple, or a function returning them: ``--method`` reads
    the method registry when validated, so a method registered later is accepted), or None."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field carrying its CLI help (and optional ``choices`` / ``nargs`` / ``aliases``)."""
    meta = {"help": help, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainingConfig:
    """Configuration of one fine-tuning run (truncated adjoint matching or a baseline).

    Defaults give the short out-of-the-box run: ODE-AM on the embedded digits base toward the
    ``digits`` reward, in under two minutes on two CPU cores.
    """

    # -- model ------------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = _f(
        None,
        "Local diffusers pipeline folder, Hub id, or short name: " + short_names_help() + ". A local folder "
        "wins over a short name of the same spelling. Default: the embedded digits base "
        "(diffusers_am/assets/digits-sit). Alias: --pretrained.",
        aliases=("--pretrained",),
    )
    offload_text_encoder: bool = _f(
        False,
        "Keep the text encoders on the CPU except while encoding a batch (text-to-image model adapters: FLUX, "
        "FLUX.2, SD3; SiT has no text encoder).",
    )
    max_sequence_length: int | None = _f(
        None, "Prompt length in tokens for the text encoder (None: the pipeline's default; text-to-image only)."
    )
    quantize_base: str = _f(
        "none",
        "Quantize the frozen base with bitsandbytes: nf4 (4-bit NormalFloat) or int8 (LLM.int8) for the "
        "transformer, and for the text encoders unless --cache_prompt_embeddings; the LoRA stays in the training "
        "dtype on top (QLoRA). On a GPU through diffusers' quantization config, on a CPU by quantizing the loaded "
        "layers. FLUX.2-klein, FLUX.1, SD3; one process or DDP (not FSDP / DeepSpeed). Needs bitsandbytes.",
        choices=quantize_choices,
    )
    # -- method -----------------------------------------------------------------------------
    method: str = _f(
        "ode-am",
        "Update rule: ode-am (deterministic adjoint matching), sde-am "
        "(stochastic AM, memoryless schedule), draft (DRaFT-K) or refl (ReFL-K); "
        "diffusers_am.training.methods registers them (and any method you add).",
        choices=method_names,
    )
    truncate_steps: int | str = _f(
        4,
        "K: train on the last K of the num_inference_steps sampling steps (K = N: full AM), or 'auto' (ode-am, "
        "sde-am): the smallest terminal window holding --truncate_share of the control energy, measured by a "
        "full-trajectory probe every --truncate_refresh_steps updates.",
        auto=True,
    )
    truncate_share: float = _f(0.3, "--truncate_steps auto: share q in (0, 1] of the control energy the window holds.")
    truncate_min_steps: int = _f(1, "--truncate_steps auto: the smallest window K it may pick.")
    truncate_max_steps: int | None = _f(None, "--truncate_steps auto: the largest window K (None: N).")
    truncate_refresh_steps: int = _f(10, "--truncate_steps auto: probe again (and re-pick K) every this many updates.")
    truncate_smoothing: float = _f(
        0.5, "--truncate_steps auto: weight in [0, 1) of the previous energy profile when a new probe arrives."
    )
    reg_order: float = _f(2.0, "p > 1: order of the control cost |u|^p / p (ode-am only; 2 = quadratic, KL-like).")
    reward: str = _f(
        "digits",
        "Reward: a registered name, a weighted list 'a:1.0,b:0.5', or 'module:callable' "
        "(a differentiable f(images [B,C,H,W] in [0,1], prompts) -> Tensor[B]).",
    )
    reward_model_paths: list[str] = _f(
        [], "Local checkpoints for registered rewards, as name=path (one per reward).", nargs="+"
    )
    reward_scale: float = _f(
        10.0, "lambda: terminal cost g(x) = -lambda * r(x); larger pulls harder toward the reward."
    )
    match_reward_scale: str = _f(
        "none",
        "Read --reward_scale as the lambda of 2nd-order ODE-AM and rescale it for this method (ode-am of order p, "
        "sde-am) so that the target control has the same size at the start of training: 'velocity' (the "
        "target velocity change over the window), 'reward_gain' (its first-order reward gain), or 'none'.",
        choices=MATCH_STATISTICS,
    )
    match_probe_batches: int = _f(
        4, "--match_reward_scale: batches (of train_batch_size) the set-up probe measures the control size on."
    )
    num_inference_steps: int | None = _f(
        None, "N sampling steps per trajectory (None: the pipeline's default, 20 for " "the digits base)."
    )
    resolution: int | None = _f(None, "Image side in pixels (None: the model family's default).")
    guidance_scale: float | None = _f(None, "Classifier-free guidance scale of the sampler (None: the family default).")
    loss_reduction: str = _f(
        "sum", "AM matching loss over a sample's dims: 'sum' (the squared norm) or 'mean'.", choices=("sum", "mean")
    )
    sde_schedule: str = _f(
        "memoryless",
        "Noise schedule sigma(t) of sde-am: memoryless (sigma^2 = 2 (1 - t) / t, the reward-tilted law), constant "
        "(sigma = 1), linear (sigma^2 = 2 (1 - t)) or sine (sigma^2 = 2 sin^2(pi t)); the last two are SiT's "
        "'sigma' and 'increasing-decreasing' diffusion coefficients, biased, compared in the paper's Appendix D.2.",
        choices=sde_schedule_choices,
    )
    sde_t_min: float = _f(0.01, "sde-am clips paper time t to [sde_t_min, 1) (the memoryless SDE diverges at t = 0).")
    # -- optimization -------------------------------------------------------------------------
    train_batch_size: int = _f(16, "Trajectories per process per micro-batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer update.")
    max_train_steps: int = _f(100, "Optimizer updates in the run.")
    learning_rate: float = _f(3e-3, "AdamW learning rate of the LoRA parameters.")
    lr_scheduler: str = _f(
        "constant",
        "LR schedule (diffusers.optimization.get_scheduler): constant, "
        "constant_with_warmup, cosine (with warm-up), linear, ...",
        choices=LR_SCHEDULERS,
    )
    lr_warmup_steps: int = _f(0, "Linear warm-up updates of the LR schedule.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.99, "AdamW beta2 (the paper uses 0.99).")
    adam_weight_decay: float = _f(0.0, "AdamW decoupled weight decay on the LoRA parameters.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(10.0, "Clip the global gradient norm to this (the paper: 10 for SiT, 1 for FLUX).")
    mixed_precision: str | None = _f(
        None,
        "no, fp16 or bf16 (None: accelerate's config). The base weights are "
        "cast to it; LoRA weights and the adjoint stay fp32.",
        choices=MIXED_PRECISION,
    )
    gradient_checkpointing: bool = _f(False, "Recompute transformer activations in backward (less memory).")
    use_8bit_adam: bool = _f(False, "bitsandbytes AdamW8bit instead of torch AdamW (needs `pip install bitsandbytes`).")
    micro_batch_size: int | None = _f(
        None,
        "Run the adjoint and loss steps (and the VAE decode and reward of them) in micro-batches of this many "
        "trajectories; sampling still draws train_batch_size at once. Gradients accumulate with each micro-batch's "
        "loss scaled by its share, so the update equals the full-batch one; peak memory follows this, not the "
        "batch. None: the whole batch at once.",
    )
    cache_prompt_embeddings: bool = _f(
        False,
        "Encode every training and validation prompt once at set-up, then free the text encoders (text-to-image "
        "models; the bytes freed are printed). Updates are identical to encoding per batch.",
    )
    prompt_cache_dir: str | None = _f(
        None,
        "With --cache_prompt_embeddings: keep the cache in this folder as a safetensors file, reused by a later "
        "run with the same model, prompts and settings.",
    )
    compile: bool = _f(
        False,
        "Regional compilation: torch.compile each repeated transformer block (diffusers' compile_repeated_blocks "
        "where the model declares its blocks); the first update pays the compile time (logged).",
    )
    compile_backend: str = _f(
        "inductor",
        "torch.compile backend of --compile: inductor (generated kernels; needs a C++ compiler on CPU) or "
        "aot_eager / eager (graph capture only: a quick check, no speed-up).",
        choices=("inductor", "aot_eager", "eager"),
    )
    # -- LoRA -------------------------------------------------------------------------------
    rank: int = _f(8, "LoRA rank.")
    lora_alpha: float | None = _f(None, "LoRA alpha (None: equal to the rank).")
    lora_target_modules: list[str] | None = _f(
        None,
        "Module names to adapt (None: the family's default targets); " "comma-separated or space-separated.",
        nargs="+",
    )
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    use_ema: bool = _f(False, "Keep an EMA of the LoRA weights; validation, evaluation and the saved adapter use it.")
    ema_decay: float = _f(0.99, "EMA decay (diffusers EMAModel, with its (1 + n) / (10 + n) warm-up).")
    # -- data -------------------------------------------------------------------------------
    prompts: str | None = _f(
        None,
        "Training prompts: a .txt (one per line), .csv or .jsonl file, a `datasets` folder "
        "or Hub dataset name. Class-conditional models take class labels (ints); None: all classes.",
    )
    prompt_column: str | None = _f(
        None, "Column of CSV / JSONL / dataset prompts (None: 'prompt', or 'label' for " "class-conditional models)."
    )
    prompts_split: str = _f("train", "Split of a `datasets` dataset.")
    validation_prompts: list[str] | None = _f(
        None,
        "Prompts (or labels) of the validation grid (None: the first "
        "training prompts, at most 4; class labels: at most 10).",
        nargs="+",
    )
    num_validation_images: int = _f(4, "Images per validation prompt (one grid row each).")
    validation_steps: int = _f(
        25, "Write a validation grid every this many updates (and at the end); 0: only at the end."
    )
    validation_reward: str | None = _f(
        None,
        "A reward never trained on (e.g. digits-heldout, imagereward), scored on every validation grid and "
        "logged as validation/heldout_reward beside the training reward (None: off).",
    )
    validation_features: str | None = _f(
        None,
        "Feature extractor for validation diversity and Recall / Coverage of the grid against the base "
        "model's grid on the same noise: clip, clip:<folder>, digits, digits-heldout or module:callable (None: off).",
    )
    validation_diversity: str = _f(
        "auto", "Within-prompt diversity on validation grids: auto (by image size), none, or comma-separated names."
    )
    num_eval_samples: int = _f(
        100,
        "Samples for the reward before / after (fixed noise and prompts, base vs "
        "fine-tuned); 0 skips that evaluation.",
    )
    # -- checkpoints and outputs --------------------------------------------------------------
    output_dir: str | None = _f(
        None,
        "Where the adapter, grids, card, log and checkpoints go (None: outputs/<model>-<method>, named after "
        "--pretrained: outputs/digits-sit-ode-am for the embedded digits base, outputs/FLUX.2-klein-4B-ode-am "
        "for --pretrained FLUX.2-klein).",
    )
    overwrite_output_dir: bool = _f(
        False,
        "Start a new run in an output_dir that holds a previous run of this trainer (the files that run wrote are "
        "removed at set-up; other files stay). A folder that is not a run is never written into.",
    )
    checkpointing_steps: int = _f(0, "Save a resumable checkpoint every this many updates (0: never).")
    checkpoints_total_limit: int | None = _f(None, "Keep at most this many checkpoints (oldest removed first).")
    resume_from_checkpoint: str | None = _f(
        None, "A checkpoint folder, or 'latest' (the newest intact one in output_dir; damaged ones are skipped)."
    )
    report_to: str = _f("tensorboard", "Tracker for accelerate: tensorboard, wandb, all or none.", choices=TRACKERS)
    logging_dir: str = _f("logs", "Tracker folder, relative to output_dir.")
    tracker_project_name: str = _f("adjoint-matching", "Project name for the tracker.")
    seed: int = _f(0, "Seed of LoRA init, noise, prompt order and validation noise.")
    cpu_threads: int | None = _f(
        None,
        "torch intra-op threads when training on CPU (None: $OMP_NUM_THREADS if set, else 1). Small models run "
        "fastest single-threaded, and one thread avoids OpenMP's slowdown on a CPU shared with other jobs.",
    )
    # -- hub --------------------------------------------------------------------------------
    push_to_hub: bool = _f(False, "Upload output_dir (adapter, card, grids; not checkpoints) with huggingface_hub.")
    hub_model_id: str | None = _f(None, "Hub repo id to push to (None: the output_dir folder name).")
    hub_token: str | None = _f(None, "Hub token (else the cached login). Never logged or written anywhere.")

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Coerce YAML / JSON spellings to each field's type (strictly), then raise ValueError naming the
        first bad field and how to fix it."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f, getattr(self, f.name)))
        for f in dataclasses.fields(self):
            choices = _choices(f)
            value = getattr(self, f.name)
            if choices is not None and value is not None:
                one_of(value, f"--{f.name}", choices)
        from ..control import check_order

        self.reg_order = check_order(self.reg_order, "reg_order")
        if self.truncate_steps != "auto":
            _check_int(self, "truncate_steps", minimum=1)
        self._validate_adaptive()
        for name in (
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "rank",
            "num_validation_images",
        ):
            _check_int(self, name, minimum=1)
        for name in ("lr_warmup_steps", "validation_steps", "checkpointing_steps", "num_eval_samples", "seed"):
            _check_int(self, name, minimum=0)
        if self.seed >= 2**32:
            raise UserError(f"`--seed` must be below 2**32 (numpy's limit); got {self.seed}.")
        optional_counts = ("num_inference_steps", "resolution", "checkpoints_total_limit", "cpu_threads")
        for name in (*optional_counts, "max_sequence_length", "micro_batch_size"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1)
        if self.num_inference_steps is not None and self.truncate_steps != "auto":
            from ..flow import check_truncation  # imports torch: validation only, never for --help

            check_truncation(self.truncate_steps, self.num_inference_steps, "--truncate_steps")
        for name in ("learning_rate", "reward_scale", "max_grad_norm", "adam_epsilon"):
            positive_float(getattr(self, name), f"--{name}")
        for name in ("adam_beta1", "adam_beta2", "ema_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise UserError(f"`--{name}` must be in [0, 1); got {value!r}.")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise UserError(
                f"`--lora_alpha` must be > 0 (the LoRA update is scaled by alpha / rank); got {self.lora_alpha!r}."
            )
        if self.adam_weight_decay < 0:
            raise UserError(f"`--adam_weight_decay` must be >= 0; got {self.adam_weight_decay!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"`--lora_dropout` must be in [0, 1); got {self.lora_dropout!r}.")
        if not 0.0 < self.sde_t_min < 1.0:
            raise UserError(f"`--sde_t_min` must be in (0, 1); got {self.sde_t_min!r}.")
        if self.prompt_cache_dir is not None and not self.cache_prompt_embeddings:
            raise UserError("`--prompt_cache_dir` needs `--cache_prompt_embeddings`: add it, or drop the folder.")
        if self.micro_batch_size is not None and self.micro_batch_size > self.train_batch_size:
            raise UserError(
                f"`--micro_batch_size` ({self.micro_batch_size}) must not exceed `--train_batch_size` "
                f"({self.train_batch_size}): lower it, or leave it unset for the whole batch."
            )
        if not isinstance(self.reward, str) or not self.reward.strip():
            raise UserError("`--reward` must be a non-empty reward spec, e.g. 'digits'.")
        if self.output_dir is not None and not self.output_dir:
            raise UserError("`--output_dir` must be a folder path.")
        if self.pretrained_model_name_or_path is not None:  # short names -> Hub ids (recorded so in the card)
            self.pretrained_model_name_or_path = resolve_pretrained(self.pretrained_model_name_or_path)
        if self.output_dir is None:
            self.output_dir = default_output_dir(self.pretrained_model_name_or_path, self.method)
        self.lora_target_modules = _split_list(self.lora_target_modules)
        self.reward_paths()  # validates the name=path pairs

    def _validate_adaptive(self) -> None:
        """The adaptive-truncation and matched-lambda knobs (one-line errors)."""
        from .methods import methods_with_control

        for name in ("truncate_min_steps", "truncate_refresh_steps", "match_probe_batches"):
            _check_int(self, name, minimum=1)
        if self.truncate_max_steps is not None:
            _check_int(self, "truncate_max_steps", minimum=self.truncate_min_steps)
            if self.num_inference_steps is not None and self.truncate_max_steps > self.num_inference_steps:
                raise UserError(
                    f"`--truncate_max_steps` ({self.truncate_max_steps}) must not exceed `--num_inference_steps` "
                    f"({self.num_inference_steps}); lower it or leave it unset (N)."
                )
        if not 0.0 < self.truncate_share <= 1.0:
            raise UserError(f"`--truncate_share` must be in (0, 1] (e.g. 0.3); got {self.truncate_share!r}.")
        if not 0.0 <= self.truncate_smoothing < 1.0:
            raise UserError(f"`--truncate_smoothing` must be in [0, 1); got {self.truncate_smoothing!r}.")
        for name, active, fix in (
            ("--truncate_steps auto", self.truncate_steps == "auto", "pass an integer --truncate_steps"),
            (f"--match_reward_scale {self.match_reward_scale}", self.match_reward_scale != "none", "drop the flag"),
        ):
            if active and self.method not in methods_with_control():
                raise UserError(
                    f"`{name}` needs a method with a control to measure ({', '.join(methods_with_control())}); "
                    f"--method {self.method} has none: {fix}."
                )

    @property
    def adaptive_truncation(self) -> bool:
        """Whether K is picked by the probe (``--truncate_steps auto``)."""
        return self.truncate_steps == "auto"

    # -- derived views ------------------------------------------------------------------------
    def reward_paths(self) -> dict[str, str]:
        """``--reward_model_paths`` as {reward name: path}."""
        out = {}
        for item in self.reward_model_paths or []:
            name, sep, path = str(item).partition("=")
            if not sep or not name or not path:
                raise UserError(f"`--reward_model_paths` entries must be name=path; got {item!r}.")
            out[name] = path
        return out

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """All fields as plain values; secrets (``hub_token``) left out unless ``redact=False``."""
        out = dataclasses.asdict(self)
        if redact:
            for name in SECRET_FIELDS:
                out.pop(name, None)
        return out

    def tracker_config(self) -> dict[str, Any]:
        """Redacted fields as scalars (tensorboard hparams take int, float, str and bool only)."""
        return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in self.to_dict().items()}

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingConfig":
        """Build from a dict of fields (any subset); ValueError naming unknown keys."""
        if not isinstance(values, dict):
            raise UserError(
                f"`config` must be a TrainingConfig or a dict of its fields; got {type(values).__name__}."
            )
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(
                f"unknown config field(s) {', '.join(unknown)}: see `python -m diffusers_am.train --help` "
                "for the names."
            )
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainingConfig":
        """Build from a YAML or JSON file (any subset of the fields), then ``overrides``."""
        values = load_config_file(path)
        values.update(overrides)
        return cls(**values)


def default_output_dir(pretrained: str | None, method: str) -> str:
    """``outputs/<model>-<method>``: the model is the last part of the pipeline folder or Hub id (``digits-sit``
    for the embedded base, None), so that runs of different models never share a default folder."""
    from ..models import EMBEDDED_DIGITS_BASE

    name = Path(str(pretrained or EMBEDDED_DIGITS_BASE).rstrip("/\\")).name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return str(Path("outputs") / f"{name}-{method}")


BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
"""The spellings a boolean option accepts (any case), on the command line and in ``--config`` files."""


def parse_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: a bool, 0 / 1, or one of :data:`BOOL_WORDS` (any case); else ValueError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
        return BOOL_WORDS[value.strip().lower()]
    raise UserError(f"`--{name}` must be true or false (also yes/no, 1/0); got {value!r}.")


def _kind(f: dataclasses.Field) -> tuple[str, bool]:
    """(bool | int | float | str | list, whether None is allowed) from a field's annotation."""
    ann = str(f.type).replace(" ", "")
    optional = ann.endswith("|None")
    for kind in ("bool", "int", "float", "list"):
        if ann.startswith(kind):
            return kind, optional
    return "str", optional


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """``value`` of field ``f`` converted strictly to its type: booleans from :data:`BOOL_WORDS`, integers
    from ints or integer strings (never 1.5 or True), finite floats from numbers or numeric strings,
    strings from strings, lists from lists (or one string); ValueError naming the flag otherwise."""
    kind, optional = _kind(f)
    name = f.name
    if f.metadata.get("auto") and isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if value is None:
        if optional:
            return None
        raise UserError(f"`--{name}` must be set (it has no 'none' value).")
    if kind == "bool":
        return parse_bool(value, name)
    if kind == "int":
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            also = " or 'auto'" if f.metadata.get("auto") else ""
            raise UserError(f"`--{name}` must be an integer{also}; got {value!r}.")
        return value
    if kind == "float":
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise UserError(f"`--{name}` must be a number; got {value!r}.") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise UserError(f"`--{name}` must be a number; got {value!r}.")
        if not math.isfinite(number):
            raise UserError(f"`--{name}` must be a finite number; got {value!r}.")
        return float(number)
    if kind == "list":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, (str, int)) for v in items):
            raise UserError(f"`--{name}` must be a list of strings; got {value!r}.")
        return list(items)
    if value is False and "no" in (_choices(f) or ()):
        return "no"  # YAML reads an unquoted `mixed_precision: no` as false
    if not isinstance(value, str):
        raise UserError(f"`--{name}` must be a string; got {value!r}.")
    return value


def _check_int(cfg: TrainingConfig, name: str, minimum: int) -> None:
    int_at_least(getattr(cfg, name), f"--{name}", minimum)


def _split_list(value: Sequence[str] | str | None) -> list[str] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    out = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    return out or None


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainingConfig))


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``--config`` file: a YAML (.yaml / .yml) or JSON mapping of field names to values."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"`--config` {str(path)!r} is not a file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"`--config` {str(path)!r} is not a UTF-8 text file (YAML or JSON).") from None
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text, object_pairs_hook=_json_mapping(path))
        else:
            values = _load_yaml(text, path)
    except _DuplicateKey as dup:
        raise UserError(str(dup)) from None
    except Exception as err:  # yaml.YAMLError, json.JSONDecodeError
        raise UserError(f"`--config` {str(path)!r} is not valid YAML/JSON: {err}") from err
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"`--config` {str(path)!r} must hold a mapping of option names to values.")
    values = _option_names(values, path)
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise UserError(
            f"`--config` {str(path)!r} has unknown option(s) {', '.join(unknown)}; "
            f"run `train_adjoint_matching.py --help` for the list."
        )
    return values  # TrainingConfig coerces YAML spellings (`1e-3` is a string to YAML, `"no"` a bool to us)


class _DuplicateKey(Exception):
    """A key set twice in a ``--config`` file (raised from inside the YAML / JSON parser)."""


def _duplicate(path: Path, key: Any, where: str = "") -> _DuplicateKey:
    return _DuplicateKey(
        f"`--config` {str(path)!r}{where}: option {str(key)!r} is set twice; keep one of the two lines "
        "(a file never sets an option twice, so that no value is dropped silently)."
    )


def _json_mapping(path: Path):
    """``json.loads`` object hook: a dict of the pairs, refusing a key given twice."""

    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise _duplicate(path, key)
            out[key] = value
        return out

    return build


def _load_yaml(text: str, path: Path) -> Any:
    """``yaml.safe_load`` of ``text``, refusing a mapping key given twice (PyYAML keeps the last silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise _duplicate(path, key, f", line {line} (first set on line {seen[key]})")
                if isinstance(key, (str, int, float, bool)):
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 -- a SafeLoader subclass


def _option_names(values: dict[Any, Any], path: Path) -> dict[str, Any]:
    """Keys as field names (``--learning-rate`` -> ``learning_rate``); ValueError when two keys of the file
    name the same option (``learning-rate`` beside ``learning_rate``)."""
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in values.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in out:
            raise UserError(
                f"`--config` {str(path)!r} sets option {name!r} twice ({spelled[name]!r} and {str(key)!r}); "
                "keep one of them."
            )
        out[name], spelled[name] = value, str(key)
    return out


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``error: ...``, exit code 2), not the usage
    of every flag followed by the message."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class BoolFlag(argparse.Action):
    """A boolean flag: ``--name`` (true), ``--name VALUE`` (any of :data:`BOOL_WORDS`) or ``--no-name``."""

    def __init__(self, option_strings: list[str], dest: str, default: Any = None, help: str | None = None):
        negated = [f"--no-{s[2:]}" for s in option_strings if s.startswith("--")]
        super().__init__(option_strings + negated, dest, nargs="?", default=default, help=help, metavar="BOOL")

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"argument {option_string} takes no value; got {values!r}")
            setattr(namespace, self.dest, False)
            return
        try:
            setattr(namespace, self.dest, True if values is None else parse_bool(values, self.dest))
        except UserError as err:
            parser.error(str(err))


_PARSERS = {"bool": str, "int": int, "float": float, "str": str, "list": str}


def _int_or_auto(text: str) -> int | str:
    """An integer, or the word 'auto' (any case)."""
    return "auto" if text.strip().lower() == "auto" else int(text)


_int_or_auto.__name__ = "integer or 'auto'"


def _optional(parse):
    def convert(text: str):
        return None if text.lower() in ("none", "null") else parse(text)

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def build_parser() -> argparse.ArgumentParser:
    """The CLI: ``--config`` plus one flag per :class:`TrainingConfig` field."""
    parser = OneLineErrorParser(
        prog="train_adjoint_matching.py",
        description="Fine-tune a flow-matching pipeline toward a reward with truncated adjoint matching "
        "(or DRaFT-K / ReFL-K) and save a diffusers LoRA adapter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a flag is its full name or a documented alias (``--pretrained``)
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML or JSON file setting any of the options below; " "command-line flags override it.",
    )
    for f in dataclasses.fields(TrainingConfig):
        kind, optional = _kind(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata["help"]}
        if kind == "bool":
            kwargs["action"] = BoolFlag
        else:
            kwargs["type"] = _optional(_PARSERS[kind]) if optional else _PARSERS[kind]
            if f.metadata.get("auto"):
                kwargs["type"] = _int_or_auto
            if "choices" in f.metadata and not callable(f.metadata["choices"]):  # a registry: checked by validate
                kwargs["choices"] = list(_choices(f)) + ([None] if optional else [])
            if "nargs" in f.metadata:
                kwargs["nargs"] = f.metadata["nargs"]
        parser.add_argument(f"--{f.name}", *f.metadata.get("aliases", ()), **kwargs)
    return parser


_UNSET = object()


def parse_args(argv: Sequence[str] | None = None) -> TrainingConfig:
    """Parse the command line (``--config`` first, flags override it) into a validated config.

    Values from the ``--config`` file are validated by :class:`TrainingConfig` itself (argparse would
    convert them as if typed on the command line); an error in one names the file."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    from_file = load_config_file(pre.config) if pre.config else {}
    parser.set_defaults(**{name: _UNSET for name in FIELD_NAMES})
    given = vars(parser.parse_args(argv))
    given.pop("config")
    values = {name: value for name, value in given.items() if value is not _UNSET}
    for name, value in from_file.items():
        values.setdefault(name, value)
    # a pipeline folder's diffusers_am_defaults.json ("training") fills what neither the flags nor the file set
    for name, value in pipeline_defaults(values.get("pretrained_model_name_or_path"), "training").items():
        if name in FIELD_NAMES:
            values.setdefault(name, value)
    try:
        config = TrainingConfig(**values)
        from ..rewards import check_reward_spec

        check_reward_spec(config.reward)  # the CLI's --reward, before any model is loaded
        return config
    except UserError as err:
        match = re.match(r"`--(\w+)`", str(err))
        if match and match.group(1) in from_file and given.get(match.group(1)) is _UNSET:
            raise UserError(f"{str(err).rstrip('.')} (in `--config` {pre.config!r}).") from None
        raise


# -- objects passed from Python, recorded honestly -----------------------------------------------------------

CALLBACK_METHODS = ("on_train_begin", "on_update_end", "on_save", "on_train_end")
"""The optional methods of a callback object, called on every process (check
``trainer.accelerator.is_main_process`` to act once):

* ``on_train_begin(trainer, ctx)``: after set-up (and a resume), before the base model's evaluation;
  ``ctx`` is the run's :class:`~.context.RunContext`.
* ``on_update_end(trainer, step, record)``: after update ``step`` (1-based) was logged; ``record`` is its
  ``train_log.jsonl`` record (a copy: changing it changes nothing).
* ``on_save(trainer, step, path)``: after the checkpoint of update ``step`` was written (``path``: its
  folder; not called when the save was abandoned), and after the final adapter was written (``path``: the
  ``.safetensors`` file on the main process, None elsewhere).
* ``on_train_end(trainer, result)``: after the run's outputs are written, with the returned ``TrainResult``.
"""


def describe_object(obj: Any) -> str:
    """``"<callable module.qualname>"``, ``"<pipeline object: FluxPipeline>"``, ``"<model adapter object: ...>"``."""
    from ..models.base import FlowModelAdapter

    if isinstance(obj, FlowModelAdapter):
        return f"<model adapter object: {type(obj).__name__}>"
    if hasattr(obj, "components") and hasattr(obj, "transformer"):
        return f"<pipeline object: {type(obj).__name__}>"
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"<callable {getattr(target, '__module__', '?')}.{target.__qualname__}>"


def is_object_record(value: Any) -> bool:
    """Whether a config string is one of :func:`describe_object`'s records (not a name or a path)."""
    return isinstance(value, str) and value.startswith("<") and value.endswith(">")


def check_prompts(prompts: Any) -> list:
    """A non-empty list of prompts (str) or class labels (int); ValueError naming ``prompts`` otherwise."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not len(prompts):
        raise UserError(
            "`prompts` must be a non-empty list of prompts or class labels (for a prompts file use the config's "
            f"`prompts` field); got {type(prompts).__name__}."
        )
    bad = [p for p in prompts if isinstance(p, bool) or not isinstance(p, (str, int))]
    if bad:
        raise UserError(f"`prompts` holds {bad[0]!r}: pass strings (text-to-image) or ints (class labels).")
    return list(prompts)


def check_lora_config(lora_config: Any) -> Any:
    """A ``peft.LoraConfig``; ValueError otherwise."""
    from peft import LoraConfig

    if not isinstance(lora_config, LoraConfig):
        raise UserError(f"`lora_config` must be a peft.LoraConfig; got {type(lora_config).__name__}.")
    return lora_config


def check_callbacks(callbacks: Any) -> list:
    """A list of objects each with at least one of :data:`CALLBACK_METHODS`; ValueError otherwise."""
    if callbacks is None:
        return []
    items = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    for cb in items:
        if not any(callable(getattr(cb, name, None)) for name in CALLBACK_METHODS):
            raise UserError(
                f"callback {cb!r} has none of the methods {', '.join(CALLBACK_METHODS)}: add one, or drop it."
            )
    return items


def record_objects(
    config: TrainingConfig, *, pipeline: Any = None, reward: Any = None, prompts: list | None = None,
    lora_config: Any = None,
) -> TrainingConfig:
    """A copy of ``config`` whose fields name the objects that replace them (``config`` is not changed)."""
    changes: dict[str, Any] = {}
    if pipeline is not None:
        changes["pretrained_model_name_or_path"] = describe_object(pipeline)
    if reward is not None:
        changes["reward"] = describe_object(reward)
    if prompts is not None:
        kind = "class labels" if all(isinstance(p, int) for p in prompts) else "prompts"
        changes["prompts"] = f"<list of {len(prompts)} {kind}>"
    if lora_config is not None:
        targets = lora_config.target_modules
        changes.update(
            rank=int(lora_config.r),
            lora_alpha=float(lora_config.lora_alpha),
            lora_dropout=float(lora_config.lora_dropout),
            lora_target_modules=None if targets is None else [targets] if isinstance(targets, str) else sorted(targets),
        )
    return dataclasses.replace(config, **changes) if changes else config


class Callbacks:
    """The trainer's callbacks, called in order; a missing method is skipped."""

    def __init__(self, callbacks: list):
        self.callbacks = list(callbacks)

    def __call__(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if callable(method):
                method(*args)
