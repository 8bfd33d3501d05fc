"""TrainingConfig / CLI, prompts loading, logs, grids, model card and Hub upload (no model needed)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_am.training import config as config_mod
from diffusers_am.training.config import TrainingConfig, build_parser, load_config_file, parse_args
from diffusers_am.prompts import PromptSampler, derive_seed
from diffusers_am.prompts import check_class_labels, load_prompts
from diffusers_am.training.logs import JsonlLog, peak_memory_bytes
from diffusers_am.metrics.grid import image_grid, save_grid


# -- CLI and --config ------------------------------------------------------------------------------
def test_every_field_is_a_flag_with_help():
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions}
    for name in config_mod.FIELD_NAMES:
        assert name in flags and flags[name].help, name
    for name in (
        "pretrained_model_name_or_path",
        "method",
        "truncate_steps",
        "reg_order",
        "reward",
        "reward_scale",
        "num_inference_steps",
        "resolution",
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "learning_rate",
        "lr_scheduler",
        "lr_warmup_steps",
        "adam_beta1",
        "adam_beta2",
        "adam_weight_decay",
        "max_grad_norm",
        "mixed_precision",
        "gradient_checkpointing",
        "use_8bit_adam",
        "rank",
        "lora_alpha",
        "lora_target_modules",
        "use_ema",
        "prompts",
        "validation_prompts",
        "validation_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "resume_from_checkpoint",
        "report_to",
        "output_dir",
        "seed",
        "push_to_hub",
        "hub_model_id",
        "hub_token",
    ):
        assert name in flags, name


def test_parse_defaults_and_flags():
    cfg = parse_args([])
    assert cfg == TrainingConfig()
    assert cfg.method == "ode-am" and cfg.reward == "digits" and cfg.pretrained_model_name_or_path is None
    cfg = parse_args(
        [
            "--method",
            "draft",
            "--truncate_steps",
            "3",
            "--reg_order",
            "4",
            "--use_ema",
            "--lora_target_modules",
            "to_q,to_k",
            "to_v",
            "--validation_prompts",
            "1",
            "2",
            "--mixed_precision",
            "bf16",
            "--lora_alpha",
            "none",
            "--lr_scheduler",
            "cosine",
        ]
    )
    assert (cfg.method, cfg.truncate_steps, cfg.reg_order, cfg.use_ema) == ("draft", 3, 4.0, True)
    assert cfg.lora_target_modules == ["to_q", "to_k", "to_v"]
    assert cfg.validation_prompts == ["1", "2"] and cfg.mixed_precision == "bf16" and cfg.lora_alpha is None


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_sets_any_flag_and_cli_overrides(tmp_path, suffix):
    values = {
        "method": "sde-am",
        "truncate_steps": 2,
        "learning_rate": "1e-3",
        "use_ema": True,
        "lora_target_modules": ["to_q"],
        "output_dir": str(tmp_path / "o"),
    }
    path = tmp_path / f"c{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    cfg = parse_args(["--config", str(path), "--truncate_steps", "3"])
    assert cfg.method == "sde-am" and cfg.truncate_steps == 3 and cfg.learning_rate == 1e-3 and cfg.use_ema
    assert cfg.lora_target_modules == ["to_q"] and cfg.output_dir == str(tmp_path / "o")
    assert TrainingConfig.from_file(path).truncate_steps == 2


def test_example_config_parses():
    from pathlib import Path

    cfg = parse_args(["--config", str(Path(__file__).resolve().parents[1] / "examples" / "digits_default.yaml")])
    assert cfg.method == "ode-am" and cfg.reward == "digits"


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methd: ode-am\n")
    with pytest.raises(ValueError, match="unknown option.*methd"):
        load_config_file(bad)
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config_file(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config_file(bad)
    with pytest.raises(ValueError, match="is not a file"):
        load_config_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "ppo"}, "--method"),
        ({"reg_order": 1.0}, "reg_order.*> 1"),
        ({"reg_order": 0.5}, "reg_order"),
        ({"truncate_steps": 11, "num_inference_steps": 10}, "truncate_steps.*num_inference_steps"),
        ({"truncate_steps": 0}, "truncate_steps"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"train_batch_size": 0}, "train_batch_size"),
        ({"adam_beta2": 1.0}, "adam_beta2"),
        ({"report_to": "mlflow"}, "report_to"),
        ({"reward_model_paths": ["digits"]}, "name=path"),
        ({"reward": " "}, "reward"),
    ],
)
def test_bad_config_values_name_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainingConfig(**kwargs)


def test_cli_rejects_unknown_method():
    # the method registry is read when the config is validated (building the parser imports no torch)
    with pytest.raises(ValueError, match=r"^`--method` must be one of ode-am, sde-am, draft, refl; got 'ppo'\.$"):
        parse_args(["--method", "ppo"])


def test_token_is_redacted():
    cfg = TrainingConfig(hub_token="hf_secret_value", validation_prompts=["a"])
    assert "hub_token" not in cfg.to_dict() and "hf_secret_value" not in json.dumps(cfg.tracker_config())
    assert all(isinstance(v, (int, float, str, bool)) for v in cfg.tracker_config().values())
    assert cfg.to_dict(redact=False)["hub_token"] == "hf_secret_value"


# -- prompts -----------------------------------------------------------------------------------------
def test_prompts_from_txt_csv_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert load_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.csv").write_text('id,prompt\n1,a cat\n2,"a dog, running"\n')
    assert load_prompts(tmp_path / "p.csv") == ["a cat", "a dog, running"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n"a dog"\n\n{"caption": "x", "prompt": "a cow"}\n')
    assert load_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog", "a cow"]
    (tmp_path / "l.txt").write_text("3\n7\n")
    assert load_prompts(tmp_path / "l.txt", conditioning="class") == [3, 7]
    (tmp_path / "l.jsonl").write_text('{"label": 2}\n5\n')
    assert load_prompts(tmp_path / "l.jsonl", conditioning="class") == [2, 5]


def test_prompts_from_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a cat", "a dog"], "label": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(tmp_path / "ds", column="text") == ["a cat", "a dog"]
    assert load_prompts(str(tmp_path / "ds"), conditioning="class") == [1, 2]
    with pytest.raises(ValueError, match="no column 'prompt'"):
        load_prompts(tmp_path / "ds")


def test_bad_prompts_name_the_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(empty)
    labels = tmp_path / "labels.txt"
    labels.write_text("1\n2\nseven\n")
    with pytest.raises(ValueError, match="line 3.*'seven'.*class label"):
        load_prompts(labels, conditioning="class")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "ok"}\n{"prompt": "broken"\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_prompts(jsonl)
    jsonl.write_text('{"prompt": "ok"}\n{"text": "no key"}\n')
    with pytest.raises(ValueError, match="line 2.*no key 'prompt'"):
        load_prompts(jsonl)
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('prompt\nfine\n""\n')
    with pytest.raises(ValueError, match="line 3.*non-empty prompt"):
        load_prompts(csv_file)
    csv_file.write_text("caption\nfine\n")
    with pytest.raises(ValueError, match="line 1.*no column 'prompt'"):
        load_prompts(csv_file)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        check_class_labels([1, 12], 10)


def test_prompt_batches_depend_only_on_seed_step_rank():
    sampler = PromptSampler(list(range(10)), seed=3)
    assert sampler.batch(5, 8) == PromptSampler(list(range(10)), seed=3).batch(5, 8)
    assert sampler.batch(5, 8) != sampler.batch(6, 8) and sampler.batch(5, 8, slot=1) != sampler.batch(5, 8)
    assert derive_seed(0, "noise", 1) != derive_seed(0, "noise", 2) and derive_seed(1, "a") == derive_seed(1, "a")


# -- logs, grids -------------------------------------------------------------------------------------
def test_jsonl_log_append_truncate(tmp_path):
    log = JsonlLog(tmp_path / "train_log.jsonl")
    for step in (1, 2, 3):
        log.append({"step": step, "loss": float("nan") if step == 2 else 1.0, "profile": torch.tensor([0.5, 1.0])})
    records = log.read()
    assert (
        [r["step"] for r in records] == [1, 2, 3] and records[1]["loss"] is None and records[0]["profile"] == [0.5, 1.0]
    )
    log.truncate_after(2)
    assert [r["step"] for r in log.read()] == [1, 2]
    # the peak RSS, read independently from the kernel's VmHWM (Linux; getrusage's count differs from it by a
    # few hundred kB, measured 0.05%)
    status = Path("/proc/self/status")
    if status.is_file():
        hwm = int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text())[1]) * 1024
        assert peak_memory_bytes("cpu") == pytest.approx(hwm, rel=0.01)
    else:
        assert peak_memory_bytes("cpu") > 10_000_000


def test_image_grid_layout(tmp_path):
    """Each image lands in its row-major cell, pixel for pixel (upscaled by an integer factor, nearest), on a white
    2 px frame; the saved PNG holds the same pixels."""
    from PIL import Image

    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = np.asarray(image_grid(images, nrow=3, pad=2))
    # 2 rows x 3 columns of 8 px tiles with 2 px padding: 32 x 22 px before the upscale
    scale = grid.shape[1] // 32
    assert scale >= 2 and grid.shape == (22 * scale, 32 * scale, 3)
    small = grid[::scale, ::scale]  # nearest upscale: every scale-th pixel is the original one
    assert (np.repeat(np.repeat(small, scale, 0), scale, 1) == grid).all()
    expected = np.full((22, 32, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, 3)
        y, x = 2 + row * 10, 2 + col * 10
        expected[y:y + 8, x:x + 8] = np.rint(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert (small == expected).all()
    path = save_grid(images, 3, tmp_path / "g" / "grid.png")
    assert (np.asarray(Image.open(path).convert("RGB")) == grid).all()
    with pytest.raises(ValueError, match="images"):
        image_grid(torch.rand(2, 8, 8), 2)


# -- model card, hub ---------------------------------------------------------------------------------
def _card(**overrides):
    from diffusers_am.training.outputs import render_model_card

    kwargs = dict(
        base_model="org/base-model",
        method="ode-am",
        truncate_steps=4,
        num_inference_steps=10,
        reg_order=2.0,
        reward="digits",
        reward_scale=2.0,
        steps=60,
        reward_before=-1.5,
        reward_after=-0.25,
        final_metrics={"reward_mean": -0.3, "loss": 1.0},
        grid="samples.png",
        pipeline_class="SiTPipeline",
        pipeline_module="diffusers_am.pipelines.sit",
        adapter_location="user/adapter",
        conditioning="class",
        num_eval_samples=100,
        batch_size="16 x 1 x 1",
        learning_rate=3e-3,
        lr_scheduler="constant",
        rank=8,
        lora_alpha=8,
        use_ema=False,
    )
    kwargs.update(overrides)
    return render_model_card(**kwargs)


def test_model_card_renders_run_facts():
    card = _card()
    text = str(card)
    for fact in (
        "org/base-model",
        "ode-am",
        "4 of 10",
        "| regularizer order p | 2 |",
        "`digits`",
        "| 2 |",
        "-1.5",
        "-0.25",
        "samples.png",
        "from diffusers_am.pipelines.sit import SiTPipeline",
        'pipe.load_lora_weights("user/adapter")',
        "reward_mean = -0.3",
    ):
        assert fact in text, fact
    assert card.data.base_model == "org/base-model" and "lora" in card.data.tags
    assert 'SiTPipeline.from_pretrained("org/base-model"' in text
    local = _card(base_model=__file__, method="draft")
    assert local.data.base_model is None and "unused by draft" in str(local)
    from diffusers_am.models import EMBEDDED_DIGITS_BASE

    embedded = str(_card(base_model=str(EMBEDDED_DIGITS_BASE)))
    assert "from diffusers_am.models import EMBEDDED_DIGITS_BASE" in embedded
    assert "SiTPipeline.from_pretrained(EMBEDDED_DIGITS_BASE" in embedded


def test_push_to_hub_creates_repo_then_uploads_only_run_files(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from diffusers_am.training.outputs import prepare_repo, upload_output_dir

    calls = {}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        huggingface_hub,
        "create_repo",
        lambda repo_id, exist_ok, token: calls.setdefault("create", (repo_id, exist_ok, token))
        and huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"),
    )
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    assert prepare_repo("user/adapter", token="hf_tok") == "user/adapter"
    assert calls["create"] == ("user/adapter", True, "hf_tok")
    url = upload_output_dir(tmp_path, "user/adapter", ["pytorch_lora_weights.safetensors", "validation/*"], "hf_tok")
    upload = calls["upload"]
    assert url == "https://huggingface.co/user/adapter"
    assert upload["repo_id"] == "user/adapter" and upload["folder_path"] == str(tmp_path)
    assert upload["token"] == "hf_tok"
    assert upload["allow_patterns"] == ["pytorch_lora_weights.safetensors", "validation/*"]  # never checkpoints
    with pytest.raises(ValueError, match="hub_model_id"):
        prepare_repo(" ")

    def unreachable(*args, **kwargs):  # what the HTTP client raises without a network
        raise ConnectionError("[Errno -3] Temporary failure in name resolution\nmore frames")

    monkeypatch.setattr(huggingface_hub, "create_repo", unreachable)
    with pytest.raises(ValueError, match=r"or reach the Hub repo 'user/adapter' \(ConnectionError: \[Errno -3\]"):
        prepare_repo("user/adapter")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="offline"):
        prepare_repo("user/adapter")


def test_cpu_threads_flag():
    assert parse_args(["--cpu_threads", "2"]).cpu_threads == 2 and parse_args([]).cpu_threads is None
    with pytest.raises(ValueError, match="cpu_threads"):
        TrainingConfig(cpu_threads=0)
