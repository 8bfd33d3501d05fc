"""``AdjointMatchingTrainer``: set-up and the update loop of ``train_adjoint_matching.py``.

It reaches the model only through its model adapter (:func:`diffusers_am.models.load_model_adapter`, or
:func:`~diffusers_am.models.model_adapter_for` of a pipeline passed from Python) and the
:class:`~diffusers_am.models.base.FlowModelAdapter` interface, the reward through
:func:`diffusers_am.rewards.load_reward` (or a passed callable), and the math only through the method registry
(:mod:`.methods`, whose step functions live in :mod:`diffusers_am.objectives`).

The main process first claims the output folder (:mod:`.run_folder`: an empty, new or own-run folder,
locked against a second trainer), checks the resume checkpoint (:mod:`.checkpoints`) and the Hub repo.
Set-up then builds a :class:`~.context.RunContext` once (the method looked up and its options built once),
and the :class:`~.probes.ControlProbes` that own K and lambda, checking every input (the reward's contract,
the free space) before the first write. The loop runs one :func:`.update.run_update` per update
(micro-batches, the NaN skip, the single gradient all-reduce, the optimizer step) with K and lambda passed
by name, logs it, checkpoints (:mod:`.checkpoints`) and validates (:mod:`.validation`); SIGINT / SIGTERM
stop it after the current update with a checkpoint (:mod:`.stopping`); :mod:`.outputs` writes the finished
run.
"""

from __future__ import annotations

import copy
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger

from ..errors import RunStopped, UserError
from ..jsonio import write_json
from ..models import (
    EMBEDDED_DIGITS_BASE,
    FlowModelAdapter,
    LoraSettings,
    load_model_adapter,
    model_adapter_for,
    quantize,
    read_model_index,
)
from ..prompts import PromptSampler, _as_condition, check_class_labels, derive_seed, load_prompts
from ..rewards import check_reward_output, is_user_reward, load_reward, probe_reward
from .checkpoints import (
    CheckpointManager,
    apply_learning_rate,
    check_resume_config,
    list_checkpoints,
    read_trainer_state,
    supersede_later,
)
from .config import Callbacks, TrainingConfig, check_callbacks, check_lora_config, check_prompts, record_objects
from .console import lines_above_the_bar, warn
from .context import RunContext
from .disk import bytes_to_save, check_free_space, checkpoint_bytes_estimate, tensor_bytes, write_failure
from .engines import configure_deepspeed, full_params, full_tensors, gathered_params, is_deepspeed, is_fsdp2, trainable
from .layout import (
    ADAPTER_NAME,
    BASE_GRID_NAME,
    CARD_NAME,
    CONFIG_NAME,
    GRID_NAME,
    LOG_NAME,
    VALIDATION_DIR,
    VALIDATION_LOG_NAME,
    run_entries,
    validation_grid_name,
)
from .logs import JsonlLog, finite_scalars, peak_memory_bytes
from .methods import get_method, step_options
from .outputs import TrainResult, save_adapter, write_outputs
from .probes import ControlProbes
from .run_folder import RunFolder, claim_run
from .safe_state import capture_rng
from .stopping import (
    NOTHING_TRAINED_EXIT,
    RESUME_HINT,
    Interrupted,
    RunProgress,
    StopSignals,
    agree_to_stop,
    nothing_trained,
)
from .update import check_in_sync, run_update
from .validation import ValidationMetrics, eval_reward, eval_set, validation_grid

logger = get_logger(__name__)  # main process only


def _check_tracker(report_to: str) -> None:
    """ValueError with the install command when the chosen tracker's package is missing."""
    import importlib.util

    needed = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": []}.get(report_to, [])
    for package in needed:
        if importlib.util.find_spec(package) is None:
            raise UserError(
                f"`--report_to {report_to}` needs {package}: `pip install {package}`, or pass `--report_to none`."
            )


class AdjointMatchingTrainer:
    """Fine-tunes a LoRA adapter with the configured method. ``train()`` runs the whole job and returns the
    :class:`~.result.TrainResult`.

    Args:
        config: a :class:`TrainingConfig`, or a dict of its fields.
        pipeline: a loaded diffusers pipeline of a supported family (used as loaded: its dtype, quantization and
            offloading stay; it is moved to the accelerator's device unless already there), or a model adapter
            (:class:`~diffusers_am.models.FlowModelAdapter`). Wins over ``pretrained_model_name_or_path``.
        reward: a differentiable callable ``(images [B, C, H, W] in [0, 1], prompts) -> [B]``. Wins over
            ``config.reward``.
        prompts: the training prompts (str) or class labels (int). Wins over ``config.prompts``.
        lora_config: a ``peft.LoraConfig``. Wins over ``rank`` / ``lora_alpha`` / ``lora_target_modules`` /
            ``lora_dropout``.
        callbacks: objects with any of ``on_train_begin(trainer, ctx)``, ``on_update_end(trainer, step,
            record)``, ``on_save(trainer, step, path)``, ``on_train_end(trainer, result)``
            (:data:`~.objects.CALLBACK_METHODS` documents when each is called).

    The config the run records (``training_config.json``, the tracker, the model card) names the objects
    passed, e.g. reward ``"<callable my_module.my_reward>"``; ``self.config`` is that copy (the config passed
    in is not changed).
    """

    def __init__(
        self,
        config: TrainingConfig | dict[str, Any],
        *,
        pipeline: Any = None,
        reward: Any = None,
        prompts: list | None = None,
        lora_config: Any = None,
        callbacks: list | None = None,
    ):
        if isinstance(config, dict):
            config = TrainingConfig.from_dict(config)
        if not isinstance(config, TrainingConfig):
            raise UserError(f"`config` must be a TrainingConfig or a dict of its fields; got {type(config).__name__}.")
        if reward is not None and not callable(reward):
            raise UserError(f"`reward` must be a callable (images, prompts) -> [B]; got {type(reward).__name__}.")
        self.pipeline = pipeline
        self.reward = reward
        self.prompt_list = check_prompts(prompts) if prompts is not None else None
        self.lora_config = check_lora_config(lora_config) if lora_config is not None else None
        self.callbacks = Callbacks(check_callbacks(callbacks))
        config = record_objects(
            config, pipeline=pipeline, reward=reward, prompts=self.prompt_list, lora_config=self.lora_config
        )
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.resume_path: Path | None = None
        self.run_id: str | None = None
        """The run's id: new for a new run, the checkpoint's on resume (in the marker and each checkpoint)."""
        self.hub_repo: str | None = None
        self.lr_history: list[tuple[int, float]] = [(1, config.learning_rate)]
        self.progress = RunProgress(self.output_dir)

    def hub_repo_id(self) -> str:
        """The Hub repo: as ``create_repo`` resolved it at set-up, else ``--hub_model_id`` or the output
        folder's name (as diffusers' examples do)."""
        return self.hub_repo or self.config.hub_model_id or self.output_dir.resolve().name

    # -- set-up ---------------------------------------------------------------------------------
    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        cfg = self.config
        log_with = None if cfg.report_to == "none" else cfg.report_to
        _check_tracker(cfg.report_to)
        return Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / cfg.logging_dir)
            ),
        )

    def _model_options(self) -> dict[str, Any]:
        """The model adapter options the config sets (``--offload_text_encoder``, ``--max_sequence_length``)."""
        cfg = self.config
        options: dict[str, Any] = {}
        if cfg.offload_text_encoder:
            options["offload_text_encoder"] = True
        if cfg.max_sequence_length is not None:
            options["max_sequence_length"] = cfg.max_sequence_length
        return options

    def _load_model(self, weight_dtype: torch.dtype) -> FlowModelAdapter:
        """The model adapter: of the passed pipeline / model adapter (as loaded), else loaded in ``weight_dtype``."""
        cfg, accelerator = self.config, self.accelerator
        if self.pipeline is not None:
            adapter = model_adapter_for(self.pipeline, **self._model_options())
            return quantize.prepare_passed(
                adapter, cfg.quantize_base, cfg.cache_prompt_embeddings, accelerator, weight_dtype
            )
        quantize.check_engine(cfg.quantize_base, accelerator)
        quantized = quantize.load_options(cfg.quantize_base, cfg.cache_prompt_embeddings, accelerator.device)
        path = cfg.pretrained_model_name_or_path or str(EMBEDDED_DIGITS_BASE)
        return load_model_adapter(path, dtype=weight_dtype, **self._model_options(), **quantized)

    def _load_reward(self, accelerator) -> Any:
        """The training reward: the passed callable, else ``--reward`` from the registry."""
        if self.reward is not None:
            return self.reward
        return load_reward(self.config.reward, device=accelerator.device, paths=self.config.reward_paths())

    def _conditions(self, model: FlowModelAdapter) -> tuple[list, list]:
        """(training conditions, validation conditions) in the model's conditioning kind."""
        cfg = self.config
        num_classes = getattr(model.pipeline, "num_classes", None) if model.conditioning == "class" else None
        if self.prompt_list is not None:
            prompts = [_as_condition(p, model.conditioning, "`prompts`") for p in self.prompt_list]
        elif cfg.prompts:
            prompts = load_prompts(
                cfg.prompts, conditioning=model.conditioning, column=cfg.prompt_column, split=cfg.prompts_split
            )
        elif model.conditioning == "class":
            if num_classes is None:
                raise UserError(
                    "this class-conditional model does not report `num_classes`; pass `--prompts` with its labels."
                )
            prompts = list(range(int(num_classes)))
        else:
            raise UserError("this text-to-image model needs training prompts: pass `--prompts <file or dataset>`.")
        if model.conditioning == "class":
            check_class_labels(prompts, num_classes)
        if cfg.validation_prompts:
            val = [_as_condition(v, model.conditioning, "`--validation_prompts`") for v in cfg.validation_prompts]
            if model.conditioning == "class":
                check_class_labels(val, num_classes, "--validation_prompts")
        else:
            val = list(dict.fromkeys(prompts))[: 10 if model.conditioning == "class" else 4]
        return prompts, val

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.config
        kwargs = dict(
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        if cfg.use_8bit_adam:
            from ..bnb import import_bitsandbytes

            return import_bitsandbytes("--use_8bit_adam").optim.AdamW8bit(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    def _prepare_dirs(self, accelerator, folder: RunFolder | None) -> None:
        """The first write into output_dir (main process): a new run removes the files the previous run
        there owned (``--overwrite_output_dir``), then the marker lists this run's entries and the config
        is written."""
        if not accelerator.is_main_process:
            return
        folder.start(run_entries(self.config.logging_dir), fresh=self.resume_path is None, run_id=self.run_id)
        if self.resume_path is not None and self.resume_path.resolve().parent == self.output_dir.resolve():
            moved = supersede_later(self.output_dir, self.progress.step, self.run_id, folder.record)
            if moved:
                warn(
                    f"resuming from {self.resume_path.name} replaces the later updates of this run: "
                    f"{', '.join(p.name for p in moved)} (never resumed from again; delete them when not needed)."
                )
        write_json(self.output_dir / CONFIG_NAME, self.config.to_dict())

    def _check_rewards(
        self, model: FlowModelAdapter, reward, validation: ValidationMetrics, prompts: list, resolution: int
    ) -> None:
        """Call the reward on two decoded noise samples before anything is written: one value per image and
        differentiable, else ValueError naming it; the held-out ``--validation_reward`` must give one value
        per image too."""
        cfg = self.config
        gen = torch.Generator(device=model.device).manual_seed(derive_seed(cfg.seed, "reward-probe"))
        with torch.no_grad():
            images = model.decode(model.initial_noise(2, resolution, gen)).float()
        conditions = [prompts[i % len(prompts)] for i in range(2)]
        users = self.reward is not None or is_user_reward(cfg.reward)  # the user's code: its errors are one line
        probe_reward(reward, images, conditions, cfg.reward, user_code=users)
        if validation.reward is not None:
            with torch.no_grad():
                check_reward_output(validation.reward(images, conditions), 2, cfg.validation_reward)

    def _check_free_space(self, accelerator, params: list[torch.nn.Parameter]) -> None:
        """ValueError when output_dir's disk cannot take a checkpoint and the adapter (main process)."""
        if accelerator.is_main_process:
            needed = bytes_to_save(checkpoint_bytes_estimate(params, self.config.use_ema) + tensor_bytes(params))
            check_free_space(self.output_dir, needed, "this run (a checkpoint, the adapter, grids and logs)")

    def _setup(self, accelerator, folder: RunFolder | None) -> RunContext:
        """Load the model and reward, add the LoRA, build the optimizer and LR schedule, prepare them;
        every input is checked before the first write into output_dir."""
        cfg = self.config
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
        adapter = self._load_model(weight_dtype)
        if self.pipeline is None or adapter.device != accelerator.device:  # a passed one stays where it is
            adapter = adapter.to(accelerator.device)
        n_steps = cfg.num_inference_steps or adapter.default_num_inference_steps
        method = get_method(cfg.method)
        self.probes = ControlProbes(cfg, n_steps, method)  # K (checked against N, or adaptive) and lambda
        resolution = cfg.resolution or adapter.default_resolution
        reward = self._load_reward(accelerator)
        if isinstance(reward, torch.nn.Module):
            reward.eval().requires_grad_(False)
        validation = ValidationMetrics(cfg, accelerator)  # before anything is written: a bad name fails here
        prompts, val_prompts = self._conditions(adapter)
        if cfg.cache_prompt_embeddings:
            self._cache_prompts(accelerator, adapter, prompts + val_prompts)

        times = adapter.time_grid(n_steps, resolution)  # validates --resolution for the family
        self._check_rewards(adapter, reward, validation, prompts, resolution)
        params, named = self._add_lora(adapter)
        if cfg.compile:
            from .engines import compile_repeated_blocks

            blocks = compile_repeated_blocks(adapter.transformer, backend=cfg.compile_backend)
            accelerator.print(
                f"--compile: {blocks} transformer blocks compiled ({cfg.compile_backend}) in the first update."
            )
        optimizer = self._optimizer(params)
        evals = eval_set(adapter, prompts, resolution, cfg.num_eval_samples, cfg.seed)
        self._check_free_space(accelerator, params)
        if is_deepspeed(accelerator):  # before anything is written: an old DeepSpeed fails here
            configure_deepspeed(accelerator, cfg.train_batch_size, cfg.max_grad_norm)
        self._prepare_dirs(accelerator, folder)  # first write into output_dir: every input is valid by now
        lr_scheduler = self._lr_scheduler(optimizer, accelerator.num_processes)
        train_module, optimizer, lr_scheduler = accelerator.prepare(adapter.transformer, optimizer, lr_scheduler)
        if is_fsdp2(accelerator):  # prepare replaced the parameters by sharded ones
            params, named = trainable(train_module)

        ema = None
        if cfg.use_ema:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(full_tensors(params), decay=cfg.ema_decay)  # FSDP2: over the full LoRA tensors
            accelerator.register_for_checkpointing(ema)
        return RunContext(
            config=cfg, accelerator=accelerator, adapter=adapter, train_module=train_module, reward=reward,
            method=method, method_options=step_options(method, cfg), params=params, named_params=named,
            optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema, times=times, resolution=resolution,
            n_steps=n_steps, output_dir=self.output_dir, prompts=prompts, val_prompts=val_prompts, eval_set=evals,
            validation=validation, lr_history=self.lr_history,
        )

    def _cache_prompts(self, accelerator, adapter: FlowModelAdapter, prompts: list) -> None:
        """``--cache_prompt_embeddings``: encode every prompt once, free the text encoders, print one line."""
        cfg = self.config
        if not hasattr(adapter, "cache_prompts"):
            logger.warning("`--cache_prompt_embeddings`: this model has no text encoder; nothing to cache.")
            return
        encoders = adapter._text_encoders()
        where = next(encoders[0].parameters()).device if encoders else None
        count, cached, freed = adapter.cache_prompts(
            prompts, cache_dir=cfg.prompt_cache_dir, key=str(cfg.pretrained_model_name_or_path)
        )
        accelerator.print(
            f"prompt cache: {count} prompts encoded once ({cached / 2**20:.1f} MiB); text encoders freed: "
            f"{freed / 2**30:.3f} GiB ({freed} bytes) from {where}."
        )

    def _add_lora(self, model: FlowModelAdapter) -> tuple[list[torch.nn.Parameter], dict[str, torch.nn.Parameter]]:
        """Add the LoRA (and gradient checkpointing); returns its trainable parameters, as a list and by name."""
        cfg = self.config
        settings = self.lora_config or LoraSettings(
            rank=cfg.rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules, dropout=cfg.lora_dropout
        )
        params = model.add_lora(settings)
        params = [p for p in params if p.requires_grad]
        if not params:
            raise UserError("the LoRA adapter has no trainable parameters; check `--lora_target_modules`.")
        ids = {id(p) for p in params}
        named = {n: p for n, p in model.transformer.named_parameters() if id(p) in ids}
        if cfg.gradient_checkpointing:
            if not getattr(model.transformer, "_supports_gradient_checkpointing", False):
                raise UserError(
                    "`--gradient_checkpointing`: this transformer does not support gradient checkpointing."
                )
            model.transformer.enable_gradient_checkpointing()
        return params, named

    def _lr_scheduler(self, optimizer: torch.optim.Optimizer, procs: int):
        """The diffusers LR schedule; the accelerate-wrapped scheduler steps once per process."""
        from diffusers.optimization import get_scheduler

        cfg = self.config
        return get_scheduler(
            cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=cfg.lr_warmup_steps * procs,
            num_training_steps=cfg.max_train_steps * procs,
        )

    # -- the run ----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run the whole job (on CPU with ``cpu_threads`` torch threads, restored afterwards)."""
        threads = torch.get_num_threads()
        try:
            return self._train()
        finally:
            torch.set_num_threads(threads)

    def _cpu_threads(self, device: torch.device) -> None:
        if device.type != "cpu":
            return
        env = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(self.config.cpu_threads or (int(env) if env.isdigit() and int(env) > 0 else 1))

    def _train(self) -> TrainResult:
        cfg = self.config
        if self.pipeline is None:  # a model that cannot be found is named before any folder problem
            read_model_index(cfg.pretrained_model_name_or_path or str(EMBEDDED_DIGITS_BASE))
        accelerator = self._accelerator()
        self.accelerator = accelerator
        self._cpu_threads(accelerator.device)
        progress = self.progress
        with StopSignals() as signals:
            folder = None
            try:
                claim = claim_run(cfg, accelerator, self.hub_repo_id())
                folder, self.resume_path, self.hub_repo = claim.folder, claim.resume_path, claim.hub_repo
                progress.resumed, progress.resume_path = self.resume_path is not None, self.resume_path
                self.run_id = uuid.uuid4().hex
                if self.resume_path is not None:
                    state = read_trainer_state(self.resume_path)
                    progress.step = int(state["step"])
                    self.run_id = state.get("run_id") or (folder.run_id if folder is not None else None) or self.run_id
                return self._run(accelerator, folder, signals)
            except Interrupted as sig:  # outside the updates: nothing to finish
                raise RunStopped(progress.interrupted(sig.signum), 128 + sig.signum) from None
            except KeyboardInterrupt:  # a second Ctrl-C while stopping
                raise RunStopped(progress.interrupted(signal.SIGINT, aborted=True), 130) from None
            except Exception as err:  # a full disk mid-run (after set-up's checks)
                reason = write_failure(err, self.output_dir) if progress.phase != "set-up" else None
                if reason is None:
                    raise
                raise RunStopped(progress.write_failed(reason), 1) from None
            finally:
                if folder is not None:
                    folder.release()
                if cfg.report_to != "none" and accelerator.trackers:
                    accelerator.end_training()

    def _run(self, accelerator, folder: RunFolder | None, signals: StopSignals) -> TrainResult:
        from accelerate.utils import set_seed

        cfg = self.config
        set_seed(cfg.seed)  # identical LoRA init on every process
        ctx = self._setup(accelerator, folder)
        self.ctx = ctx
        self.progress.phase = "the base model's evaluation"  # output_dir is written from here on
        ckpt = CheckpointManager(
            accelerator, self.output_dir, ctx.named_params, ctx.adapter.save_lora, cfg.checkpoints_total_limit,
            record=folder.record if folder is not None else None, ema=cfg.use_ema,
            gathered=lambda: gathered_params(ctx),
            states={"optimizer": ctx.optimizer, "lr_scheduler": ctx.lr_scheduler, "ema": ctx.ema},
        )
        self.progress.checkpoints = ckpt
        log = JsonlLog(self.output_dir / LOG_NAME)
        set_seed(cfg.seed, device_specific=True)  # per-process RNG (LoRA dropout); a resume restores it
        global_step, nonfinite = self._resume(ctx, ckpt, log)
        self.progress.step = global_step
        if accelerator.is_main_process and accelerator.trackers == [] and cfg.report_to != "none":
            accelerator.init_trackers(cfg.tracker_project_name, config=cfg.tracker_config())
        self.callbacks("on_train_begin", self, ctx)
        reward_before = self._base_model_outputs(ctx)
        if self.probes.match_pending:  # --match_reward_scale: once (a resumed run has the checkpoint's)
            self.progress.phase = "the control probe"
            self.probes.match_reward_scale(ctx)
            accelerator.print(self.probes.match_line())
        self.progress.phase = "training"
        try:
            with signals.deferred():
                global_step, nonfinite, durations, last = self._loop(ctx, ckpt, log, global_step, nonfinite, signals)
        except Exception as err:
            self._after_failure(ctx, ckpt, err)
            raise
        if global_step and nonfinite >= global_step:
            raise RunStopped(nothing_trained(global_step, cfg.reg_order), NOTHING_TRAINED_EXIT)
        self.progress.phase = "final outputs"
        try:
            return self._finish(ctx, global_step, nonfinite, durations, last, reward_before)
        except Interrupted as sig:  # keep what was trained: a checkpoint of the last update and its adapter
            with signals.stopping(sig.signum):
                self._stop(ctx, ckpt, global_step, nonfinite, sig.signum)
            raise

    def _finish(
        self, ctx: RunContext, global_step: int, nonfinite: int, durations: list[float], last: dict[str, Any],
        reward_before: float | None,
    ) -> TrainResult:
        """The final outputs (:func:`~.outputs.write_outputs`) and the callbacks of the end of the run."""
        accelerator = ctx.accelerator
        with full_params(ctx):
            check_in_sync(accelerator, ctx.params)
        out = self.output_dir
        result = TrainResult(
            out,
            out / ADAPTER_NAME,
            out / GRID_NAME,
            out / CARD_NAME,
            out / LOG_NAME,
            reward_before,
            None,
            global_step,
            nonfinite,
            sum(durations) / len(durations) if durations else None,
        )
        with full_params(ctx):
            result = write_outputs(ctx, self.probes, result, last, self.hub_repo_id())
        self.callbacks("on_save", self, global_step, result.adapter_path if accelerator.is_main_process else None)
        self.callbacks("on_train_end", self, result)
        return result

    def _resume(self, ctx: RunContext, ckpt: CheckpointManager, log: JsonlLog) -> tuple[int, int]:
        """(update, skipped updates) to start from: the resume checkpoint's, restored, or (0, 0). A changed
        ``--learning_rate`` is applied from the next update on and added to the run's LR history."""
        if self.resume_path is None:
            return 0, 0
        accelerator, cfg = self.accelerator, self.config
        state = ckpt.load(self.resume_path)
        global_step, nonfinite = int(state["step"]), int(state.get("nonfinite_count", 0))
        changes = check_resume_config(state.get("config"), cfg, str(self.resume_path), global_step)
        history = [tuple(item) for item in state.get("lr_history") or []] or [(1, cfg.learning_rate)]
        if "learning_rate" in changes:
            apply_learning_rate(ctx.optimizer, ctx.lr_scheduler, cfg.learning_rate)
            history.append((global_step + 1, cfg.learning_rate))
        self.lr_history[:] = history
        self.probes.load_state_dict(state)
        if accelerator.is_main_process:  # the updates after the checkpoint are redone: drop their records
            log.truncate_after(global_step)
            redo = 1 if self._validation_due(global_step) else 0  # the checkpoint's own validation is redone too
            JsonlLog(self.output_dir / VALIDATION_LOG_NAME).truncate_after(global_step - redo)
            self._drop_grids_after(global_step - redo)
        if self.resume_path.parent.resolve() == self.output_dir.resolve():
            self.progress.saved_at = global_step
        changed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items() if k != "resume_from_checkpoint")
        accelerator.print(
            f"Resumed from {self.resume_path} at update {global_step}." + (f" Changed: {changed}." if changed else "")
        )
        return global_step, nonfinite

    def _state(self, nonfinite: int) -> dict[str, Any]:
        """What a checkpoint records besides the step: skipped updates, the config, the LR history, and the
        lambda and adaptive window the run uses (so that a resume continues with them, not a new probe)."""
        return {
            "run_id": self.run_id,
            "nonfinite_count": nonfinite,
            "config": self.config.to_dict(),
            "lr_history": self.lr_history,
            **self.probes.state_dict(),
        }

    def _validation_due(self, step: int) -> bool:
        """Whether a mid-run validation grid belongs to update ``step`` (``--validation_steps``)."""
        every = self.config.validation_steps
        return bool(every) and step % every == 0 and step < self.config.max_train_steps

    def _drop_grids_after(self, step: int) -> None:
        """Remove the mid-run grids of updates after ``step`` (a resumed run redoes them)."""
        for path in (self.output_dir / VALIDATION_DIR).glob("step-*.png"):
            number = path.stem[len("step-"):]
            if number.isdigit() and int(number) > step:
                path.unlink()

    def _validate(self, ctx: RunContext, step: int) -> None:
        """The validation grid (and metrics) of update ``step``, with the EMA weights under ``--use_ema``."""
        with full_params(ctx):
            if ctx.accelerator.is_main_process:
                with ctx.ema_weights():
                    validation_grid(ctx, validation_grid_name(step), step=step)
        ctx.accelerator.wait_for_everyone()

    def _base_model_outputs(self, ctx: RunContext) -> float | None:
        """The base model's reward on the eval set (printed; None when off) and its validation grid."""
        with full_params(ctx):
            return self._base_outputs_main(ctx)

    def _base_outputs_main(self, ctx: RunContext) -> float | None:
        cfg, accelerator = self.config, ctx.accelerator
        reward_before = None
        if accelerator.is_main_process and cfg.num_eval_samples:
            reward_before = eval_reward(ctx, base=True)
            accelerator.print(
                f"reward before fine-tuning (base model, {len(ctx.eval_set[0])} samples): {reward_before:.4f}"
            )
        if accelerator.is_main_process and (self.resume_path is None or ctx.validation.features is not None):
            validation_grid(ctx, BASE_GRID_NAME, base=True, write=self.resume_path is None)
        accelerator.wait_for_everyone()
        return reward_before

    def _loop(
        self,
        ctx: RunContext,
        ckpt: CheckpointManager,
        log: JsonlLog,
        global_step: int,
        nonfinite: int,
        signals: StopSignals,
    ) -> tuple[int, int, list[float], dict[str, Any]]:
        """Updates up to ``max_train_steps``, each logged, checkpointed and validated as configured; a stop
        signal ends the loop after the current update (every process agrees) with :meth:`_stop`. Whatever is
        printed meanwhile (callbacks, warnings) goes above the progress bar (:mod:`.console`).

        Returns (updates done, skipped updates, seconds of each update run here, the last log record)."""
        with lines_above_the_bar() as bar_stream:
            return self._updates(ctx, ckpt, log, global_step, nonfinite, signals, bar_stream)

    def _updates(self, ctx, ckpt, log, global_step, nonfinite, signals, bar_stream):
        """:meth:`_loop`'s body; the progress bar writes to ``bar_stream`` (the real stderr)."""
        from tqdm.auto import tqdm

        cfg, accelerator, model = self.config, ctx.accelerator, ctx.adapter
        sampler = PromptSampler(ctx.prompts, cfg.seed)
        progress = tqdm(
            total=cfg.max_train_steps,
            initial=global_step,
            desc="updates",
            disable=not accelerator.is_local_main_process,
            file=bar_stream,
        )
        self._bar = progress  # closed by _after_failure too
        durations: list[float] = []
        record: dict[str, Any] = {}
        self._completed = self._completion(ctx, global_step, nonfinite)
        if self.resume_path is not None and self._validation_due(global_step):
            if not (self.output_dir / validation_grid_name(global_step)).is_file():  # killed while validating: redo it
                self._validate(ctx, global_step)
        while True:
            stop = agree_to_stop(accelerator, signals.requested)
            if stop:
                progress.close()
                self._stop(ctx, ckpt, global_step, nonfinite, stop)
            if global_step >= cfg.max_train_steps:
                break
            start = time.perf_counter()  # an adaptive window's probe counts in the update's time
            probe = self.probes.before_update(ctx, global_step)  # --truncate_steps auto: re-pick K when due
            model.transformer.train()
            record = run_update(
                ctx, sampler, global_step,
                truncate_steps=self.probes.truncate_steps, reward_scale=self.probes.reward_scale,
            )
            if probe is not None:
                record["probe"] = probe
            global_step += 1
            self.progress.step = global_step
            nonfinite += int(record["skipped"])
            seconds = time.perf_counter() - start
            durations.append(seconds)
            if cfg.compile and len(durations) == 2:  # compile time ~ first update - second update
                record["compile_seconds"] = durations[0] - durations[1]
                accelerator.print(
                    f"--compile: compilation took about {record['compile_seconds']:.1f} s (update 1 - update 2)."
                )
            record.update(
                step=global_step,
                nonfinite_count=nonfinite,
                seconds=seconds,
                peak_memory_bytes=peak_memory_bytes(accelerator.device),
                lr=ctx.lr_scheduler.get_last_lr()[0],
            )
            if accelerator.is_main_process:
                log.append(record)
                accelerator.log(finite_scalars(record), step=global_step)
            self._completed = self._completion(ctx, global_step, nonfinite)
            self.callbacks("on_update_end", self, global_step, copy.deepcopy(record))
            model.transformer.eval()
            progress.update(1)
            progress.set_postfix(
                reward=f"{record['reward_mean']:.3f}" if record["reward_mean"] is not None else "nan",
                loss=f"{record['loss']:.3g}" if record["loss"] is not None else "nan",
            )
            if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0:
                path = ckpt.save(global_step, self._state(nonfinite))
                self.progress.saved_at = global_step
                if path is not None:  # None: the save was abandoned (a full disk), with a warning
                    self.callbacks("on_save", self, global_step, path)
            if self._validation_due(global_step):
                self._validate(ctx, global_step)
        progress.close()
        if nonfinite:
            logger.warning(
                f"{nonfinite} of {global_step} updates were skipped: the reward or the gradient was NaN or inf."
            )
        return global_step, nonfinite, durations, record

    # -- stopping early ---------------------------------------------------------------------------------
    def _rescuable(self, ctx: RunContext) -> bool:
        """Whether a failed run can checkpoint its last completed update: one process, no DeepSpeed / FSDP2
        engine (a failure on one rank alone would leave the others waiting in a collective)."""
        acc = ctx.accelerator
        return acc.num_processes == 1 and not (is_deepspeed(acc) or is_fsdp2(acc))

    def _completion(self, ctx: RunContext, step: int, nonfinite: int) -> dict[str, Any]:
        """What a failure later needs to checkpoint update ``step``: its RNG states and marks of the state
        (LR schedule position, EMA step, a sum of the LoRA weights) to tell whether an update began changing it."""
        if not self._rescuable(ctx):
            return {"step": step, "nonfinite": nonfinite, "rng": None, "marks": None}
        return {"step": step, "nonfinite": nonfinite, "rng": capture_rng(), "marks": self._marks(ctx)}

    def _marks(self, ctx: RunContext) -> tuple:
        scheduler = getattr(ctx.lr_scheduler, "scheduler", ctx.lr_scheduler)
        with torch.no_grad():
            weights = sum(float(p.detach().double().sum()) for p in ctx.params)
        ema = getattr(ctx.ema, "optimization_step", None)
        return getattr(scheduler, "last_epoch", None), ema, weights

    def _after_failure(self, ctx: RunContext, ckpt: CheckpointManager, err: Exception) -> None:
        """A failure while training (the reward raising at update 5, a bug): keep the work of the completed
        updates. Unless the failure is a stop or a full disk (handled elsewhere), write the checkpoint of the
        last completed update when the state is still that update's (one process), then say what is on disk:
        a UserError (a user's input) becomes one line naming it; anything else keeps its traceback, after a
        warning line."""


        if getattr(self, "_bar", None) is not None:
            self._bar.close()  # before any line is printed
        done = getattr(self, "_completed", None)
        if done is None or isinstance(err, RunStopped) or write_failure(err, self.output_dir) is not None:
            return
        step, accelerator = done["step"], ctx.accelerator
        if self.progress.saved_at == step and accelerator.is_main_process:
            path = dict(list_checkpoints(self.output_dir)).get(step)
            disk = f"{path} holds update {step}: after fixing it, {RESUME_HINT}" if path else None
        elif step == 0:
            disk = "nothing was trained"
        elif done["marks"] is not None and self._marks(ctx) == done["marks"]:
            ctx.optimizer.zero_grad(set_to_none=True)
            path = ckpt.save(step, self._state(done["nonfinite"]), rng=done["rng"])
            self.progress.saved_at = step
            disk = f"saved {path}, the last completed update: after fixing it, {RESUME_HINT}" if path else None
        else:
            disk = None
        if disk is None:
            disk = self.progress.last_checkpoint_advice().rstrip(".")
        where = f"stopped after update {step} of {self.config.max_train_steps}; {disk}"
        if isinstance(err, UserError):
            raise UserError(f"{str(err).rstrip('.')} ({where}).") from None
        if accelerator.is_main_process:
            warn(f"{type(err).__name__} during training: {where}.")

    def _stop(self, ctx: RunContext, ckpt: CheckpointManager, step: int, nonfinite: int, signum: int) -> None:
        """After a stop signal (every process): write the checkpoint of ``step`` (unless it exists) and the
        adapter so far, then raise RunStopped (exit 128 + signal) with the line that says how to resume."""
        accelerator, out = ctx.accelerator, self.output_dir
        if step == 0:
            raise RunStopped(self.progress.interrupted(signum), 128 + signum)
        if self.progress.saved_at == step:  # just saved (or resumed from): every process skips the save alike
            path = dict(list_checkpoints(out)).get(step) if accelerator.is_main_process else None
        else:
            path = ckpt.save(step, self._state(nonfinite))
        adapter_note = ""
        with full_params(ctx):
            if accelerator.is_main_process:
                try:
                    adapter_note = f" and the adapter so far ({save_adapter(ctx)})"
                except Exception as err:
                    reason = write_failure(err, out)
                    if reason is None:
                        raise
                    adapter_note = f" (the adapter so far could not be written: {reason})"
        accelerator.wait_for_everyone()
        raise RunStopped(self.progress.stopped(signum, self.config.max_train_steps, path, adapter_note), 128 + signum)
