"""``--pretrained`` (alias of ``--pretrained_model_name_or_path``), the short model names, and the
one-line error when the Hub is off or unreachable (nothing written, no retry loop).

``pytest -s`` prints how long the unreachable-Hub error takes end to end."""

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _run_helpers import _fresh_accelerate_state  # noqa: F401  (fixture)

from diffusers_am.evaluate import main as evaluate_cli
from diffusers_am.models import SHORT_NAMES, read_model_index, resolve_pretrained
from diffusers_am.train import main as train_main
from diffusers_am.training.config import build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]
KLEIN = "black-forest-labs/FLUX.2-klein-4B"
EXPECTED = {
    "FLUX.2-klein": KLEIN,
    "FLUX.2-klein-4B": KLEIN,
    "FLUX.2-klein-9B": "black-forest-labs/FLUX.2-klein-9B",
    "FLUX.1-dev": "black-forest-labs/FLUX.1-dev",
    "SD3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
}


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache, so that nothing cached elsewhere answers for the Hub."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


def _check_hub_message(line: str, repo_id: str = KLEIN) -> None:
    assert repr(repo_id) in line
    assert f"hf download {repo_id} --local-dir {repo_id.split('/')[1]}" in line
    assert "huggingface-cli" not in line


# -- the alias and --help --------------------------------------------------------------------------------
def test_pretrained_is_an_alias_and_prefixes_are_refused(tmp_path, capsys):
    folder = str(tmp_path)
    assert parse_args(["--pretrained", folder]) == parse_args(["--pretrained_model_name_or_path", folder])
    for prefix in ("--pretrained_model", "--pretrain", "--max_train"):  # argparse abbreviations are off
        with pytest.raises(SystemExit) as exit_info:
            parse_args([prefix, "1"])
        assert exit_info.value.code == 2
    assert "unrecognized arguments: --max_train" in capsys.readouterr().err
    text = " ".join(build_parser().format_help().split())  # unwrap argparse's line breaks
    assert "--pretrained_model_name_or_path PRETRAINED_MODEL_NAME_OR_PATH, --pretrained" in text
    for name in [*SHORT_NAMES, "SiT-XL/2"]:
        assert name in text


# -- resolution ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXPECTED)
def test_short_names_resolve_to_hub_ids(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert resolve_pretrained(name) == EXPECTED[name]
    assert resolve_pretrained(name.lower()) == EXPECTED[name]
    assert parse_args(["--pretrained", name]).pretrained_model_name_or_path == EXPECTED[name]  # config, card


def test_hub_ids_pass_and_a_local_folder_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_pretrained("me/my-pipeline") == "me/my-pipeline"
    assert resolve_pretrained(KLEIN) == KLEIN
    (tmp_path / "FLUX.2-klein-4B").mkdir()  # where `hf download ... --local-dir FLUX.2-klein-4B` puts it
    (tmp_path / "FLUX.2-klein-4B" / "model_index.json").write_text('{"_class_name": "Flux2KleinPipeline"}')
    assert resolve_pretrained("FLUX.2-klein-4B") == "FLUX.2-klein-4B"
    assert read_model_index("FLUX.2-klein-4B")["_class_name"] == "Flux2KleinPipeline"
    with pytest.raises(ValueError, match="neither an existing local folder nor a Hub id"):
        read_model_index("./no/such/folder")


def test_sit_xl_2_names_the_converted_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        resolve_pretrained("SiT-XL/2")
    message = str(err.value)
    assert "SiT-XL-2-256x256.pt" in message and "scripts/convert_sit_checkpoint.py" in message
    assert "--output_dir sit-xl-2-256" in message and "\n" not in message
    (tmp_path / "sit-xl-2-256").mkdir()  # stands in for the converted folder
    (tmp_path / "sit-xl-2-256" / "model_index.json").write_text('{"_class_name": "SiTPipeline"}')
    assert resolve_pretrained("SiT-XL/2") == "sit-xl-2-256"
    assert read_model_index("SiT-XL/2")["_class_name"] == "SiTPipeline"


def test_offline_with_a_cached_model_index_reads_the_cache(empty_hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = empty_hub_cache / "models--black-forest-labs--FLUX.2-klein-4B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text('{"_class_name": "Flux2KleinPipeline"}')
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    assert read_model_index("FLUX.2-klein")["_class_name"] == "Flux2KleinPipeline"


# -- offline / unreachable: one line, the id, `hf download`, nothing written --------------------------------
def test_offline_hub_gives_one_line_and_writes_nothing(tmp_path, capsys, empty_hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    assert train_main(["--pretrained", "FLUX.2-klein", "--truncate_steps", "1", "--output_dir", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    _check_hub_message(line)
    assert "HF_HUB_OFFLINE=1" in line
    assert not out.exists()
    assert evaluate_cli(["--pretrained", "SD3.5-medium", "--output_dir", str(out)]) == 2
    _check_hub_message(_one_error_line(capsys.readouterr().err), "stabilityai/stable-diffusion-3.5-medium")
    assert not out.exists()


def test_unreachable_hub_gives_one_line_and_writes_nothing(tmp_path, capsys, empty_hub_cache, monkeypatch):
    """HF_HUB_OFFLINE unset, the Hub endpoint a closed local port: evaluate in this process, the trainer
    as a user runs it (a fresh process with HF_ENDPOINT set)."""
    from huggingface_hub import constants

    port = _closed_port()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    template = f"http://127.0.0.1:{port}" + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    out = tmp_path / "run"
    assert evaluate_cli(["--pretrained_model_name_or_path", "FLUX.2-klein", "--output_dir", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    _check_hub_message(line)
    assert "unreachable (ConnectError)" in line and not out.exists()

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(empty_hub_cache), HF_HOME=str(tmp_path / "hf"))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "diffusers_am.train", "--pretrained", "FLUX.2-klein", "--truncate_steps", "1",
         "--output_dir", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    seconds = time.perf_counter() - start
    print(f"\nunreachable Hub: the trainer's one-line error after {seconds:.1f} s (process start and imports included)")
    assert proc.returncode == 2, proc.stderr
    _check_hub_message(_one_error_line(proc.stderr))
    assert not out.exists() and not (tmp_path / "hf").exists()


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 - http.server's name
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_unknown_repo_names_the_id_and_the_short_names(empty_hub_cache, monkeypatch):
    from huggingface_hub import constants

    server = http.server.HTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE",
            f"http://127.0.0.1:{server.server_port}" + "/{repo_id}/resolve/{revision}/{filename}",
        )
        with pytest.raises(ValueError, match=r"'me/no-such-pipeline' is not a local folder .* \(HTTP 404\)") as err:
            read_model_index("me/no-such-pipeline")
        assert "FLUX.2-klein" in str(err.value) and "hf auth login" in str(err.value)
    finally:
        server.shutdown()
        server.server_close()
