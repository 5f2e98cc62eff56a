"""`codecomplete models pull/list/rm` end to end against a local stand-in for the Hugging
Face Hub (tests/hub_standin.py): nothing here reaches the internet."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

from hub_standin import HubStandIn, Repo, Stall  # noqa: E402

from codecomplete import hub  # noqa: E402
from codecomplete.cli import main as cli_main  # noqa: E402

REPO = "test-org/tiny-coder"
GGUF_REPO = "test-org/tiny-coder-GGUF"
QUANTS = ("Q4_K_M", "Q5_K_M", "Q8_0")
GGUF_BYTES = 3_000_000
# huggingface_hub writes a download in 10 MB chunks (constants.DOWNLOAD_CHUNK_SIZE): a file cut
# part-way keeps only whole chunks, so the interrupted file is larger than one.
BIG_GGUF = "tiny-coder-f16.gguf"
BIG_GGUF_BYTES = 24_000_000


@pytest.fixture(scope="module")
def tiny_repo_files(tmp_path_factory) -> dict[str, bytes]:
    from codecomplete.models.testing import make_test_model

    folder = tmp_path_factory.mktemp("hub-model")
    make_test_model(folder)
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _gguf_files() -> dict[str, bytes]:
    # Not loadable GGUFs: these tests pick and fetch files, they never load them.
    return {f"tiny-coder-{q.lower()}.gguf": os.urandom(GGUF_BYTES) for q in QUANTS} | {
        BIG_GGUF: os.urandom(BIG_GGUF_BYTES), "README.md": b"# tiny coder GGUF\n"}


@pytest.fixture
def standin(tmp_path, monkeypatch, tiny_repo_files):
    server = HubStandIn(repos={REPO: Repo(dict(tiny_repo_files)), GGUF_REPO: Repo(_gguf_files(), commit="b" * 40)})
    url = server.start()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("CODECOMPLETE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login token
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for offline in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(offline, raising=False)
    # other test modules set HF_HUB_OFFLINE=1 before huggingface_hub is imported, which reads it once
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield server
    server.stop()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _env(tmp_path: Path, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=url, CODECOMPLETE_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf-home"))
    return env


def test_pulled_checkpoint_completes_through_the_cli_by_name(standin, tiny_repo_files, tmp_path, capsys):
    assert cli_main(["models", "pull", REPO]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path == hub.repo_folder(REPO) / "model"
    for name, data in tiny_repo_files.items():
        if name.endswith((".safetensors", ".json")):
            assert _sha256(path / name) == hashlib.sha256(data).hexdigest()
    source = tmp_path / "example.py"
    source.write_text("def add(a, b):\n    return a\n")
    assert hub.resolve_model_path("TEST-ORG/Tiny-Coder") == str(path)
    for name in (REPO, "tiny-coder"):
        code = cli_main(["complete", str(source), "--line", "1", "--character", "12", "--model", name,
                         "--n", "2", "--max-tokens", "4", "--json"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert len(json.loads(out)["candidates"]) >= 1


def test_second_pull_downloads_nothing(standin, capsys):
    assert cli_main(["models", "pull", REPO]) == 0
    fetched = len(standin.body_gets("model.safetensors"))
    assert fetched == 1
    assert cli_main(["models", "pull", REPO]) == 0
    assert len(standin.body_gets("model.safetensors")) == fetched
    assert "already here" in capsys.readouterr().err


def test_several_ggufs_without_file_are_listed_not_downloaded(standin, capsys):
    assert cli_main(["models", "pull", GGUF_REPO]) == 2
    err = capsys.readouterr().err
    for name in [f"tiny-coder-{q.lower()}.gguf" for q in QUANTS] + [BIG_GGUF]:
        assert name in err
    assert "--file" in err and "q4_k_m" in err
    assert not [r for r in standin.requests if r.path.startswith("/cdn/")]
    assert not hub.repo_folder(GGUF_REPO).exists()


def test_file_pattern_picks_one_gguf_and_the_name_resolves_to_it(standin, capsys):
    assert cli_main(["models", "pull", GGUF_REPO, "--file", "*Q4_K_M.gguf"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.name == "tiny-coder-q4_k_m.gguf"
    expected = hashlib.sha256(standin.repos[GGUF_REPO].files[path.name]).hexdigest()
    assert _sha256(path) == expected
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert hub.resolve_model_path(GGUF_REPO) == str(path)
    assert hub.resolve_model_path("tiny-coder-GGUF") == str(path)


def test_two_pulled_ggufs_are_named_repo_colon_file(standin, capsys):
    assert cli_main(["models", "pull", GGUF_REPO, "--file", "*q4_k_m.gguf"]) == 0
    assert cli_main(["models", "pull", GGUF_REPO, "--file", "*Q8_0*"]) == 0
    with pytest.raises(hub.HubError, match=f"{GGUF_REPO}:tiny-coder-q8_0.gguf"):
        hub.resolve_model_path(GGUF_REPO)
    q8 = hub.resolve_model_path(f"{GGUF_REPO}:tiny-coder-q8_0.gguf")
    assert Path(q8).is_file()
    capsys.readouterr()
    assert cli_main(["models", "rm", f"{GGUF_REPO}:tiny-coder-q8_0.gguf"]) == 0
    assert not Path(q8).exists()
    assert hub.resolve_model_path(GGUF_REPO).endswith("tiny-coder-q4_k_m.gguf")


def test_pattern_matching_several_ggufs_is_refused(standin):
    with pytest.raises(hub.HubError, match="matches 4 GGUF files"):
        hub.pull(GGUF_REPO, ["*.gguf"])
    with pytest.raises(hub.HubError, match="no file matches"):
        hub.pull(GGUF_REPO, ["*IQ2*"])


def _remote(*names: str) -> list[hub.RemoteFile]:
    return [hub.RemoteFile(name, 10, None, None) for name in names]


def test_checkpoint_choice_takes_top_level_safetensors_with_config_and_tokenizer():
    remote = _remote("config.json", "tokenizer.json", "model.safetensors", "onnx/model.safetensors",
                     "pytorch_model.bin", "README.md")
    chosen = {f.name for f in hub.choose_files(REPO, remote, [])}
    assert chosen == {"config.json", "tokenizer.json", "model.safetensors"}
    picked = {f.name for f in hub.choose_files(REPO, remote, ["model.safetensors"])}
    assert picked == {"config.json", "tokenizer.json", "model.safetensors"}


def test_pickle_only_repo_is_refused():
    with pytest.raises(hub.HubError, match="never loads pickle"):
        hub.choose_files(REPO, _remote("config.json", "pytorch_model.bin"), [])


def test_killed_pull_resumes_with_a_range_request(standin, tmp_path):
    """A pull killed mid-file leaves a partial file; the next pull asks only for the rest."""
    name = BIG_GGUF
    standin.stalls[name] = Stall(after_bytes=BIG_GGUF_BYTES * 2 // 3)
    cmd = [sys.executable, "-m", "codecomplete", "models", "pull", GGUF_REPO, "--file", name]
    proc = subprocess.Popen(cmd, env=_env(tmp_path, standin.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert standin.stalled.wait(60), "the pull never reached the file body"
        partial_dir = hub.repo_folder(GGUF_REPO) / "partial"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sizes = [p.stat().st_size for p in partial_dir.glob("*.part")] if partial_dir.is_dir() else []
            if sizes and sizes[0] >= BIG_GGUF_BYTES // 3:
                break
            time.sleep(0.05)
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    (partial,) = partial_dir.glob("*.part")
    kept_bytes = partial.stat().st_size
    assert 0 < kept_bytes < BIG_GGUF_BYTES
    listed = [m for m in hub.list_pulled() if m.repo == GGUF_REPO]
    assert listed and not listed[0].complete
    with pytest.raises(hub.HubError, match="interrupted"):
        hub.resolve_model_path(GGUF_REPO)

    done = subprocess.run(cmd, env=_env(tmp_path, standin.url), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    resumed = standin.body_gets(name)[-1]
    assert resumed.headers.get("range") == f"bytes={kept_bytes}-"
    path = Path(done.stdout.strip())
    assert _sha256(path) == hashlib.sha256(standin.repos[GGUF_REPO].files[name]).hexdigest()
    assert not partial_dir.exists()


def test_dropped_connection_is_resumed_within_one_pull(standin):
    name = BIG_GGUF
    standin.stalls[name] = Stall(after_bytes=BIG_GGUF_BYTES * 2 // 3, close=True)
    model = hub.pull(GGUF_REPO, [name])
    gets = standin.body_gets(name)
    assert len(gets) == 2 and "range" not in gets[0].headers
    assert gets[1].headers["range"].startswith("bytes=")
    assert _sha256(model.model_path()) == hashlib.sha256(standin.repos[GGUF_REPO].files[name]).hexdigest()


def test_bytes_that_fail_the_checksum_are_refused_and_dropped(standin):
    name = "tiny-coder-q4_k_m.gguf"
    standin.corrupt.add(name)
    with pytest.raises(hub.HubError, match="do not match the Hub's checksum"):
        hub.pull(GGUF_REPO, [name])
    assert not list(hub.repo_folder(GGUF_REPO).rglob("*.gguf")) and not list(hub.repo_folder(GGUF_REPO).rglob("*.part"))
    standin.corrupt.clear()
    assert hub.pull(GGUF_REPO, [name]).model_path().name == name


def test_offline_mode_is_a_clear_error_without_any_request(standin, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE"):
        hub.pull(REPO)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    with pytest.raises(hub.HubError, match="TRANSFORMERS_OFFLINE"):
        hub.pull(REPO)
    assert standin.requests == []


def test_unreachable_endpoint_is_a_clear_error(standin, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(hub.HubError, match=f"cannot reach http://127.0.0.1:{port}"):
        hub.pull(REPO)


def test_unknown_repo_and_revision_are_clear_errors(standin, capsys):
    with pytest.raises(hub.HubError, match="no repository test-org/missing"):
        hub.pull("test-org/missing")
    with pytest.raises(hub.HubError, match="no revision 'v9'"):
        hub.pull(REPO, revision="v9")
    assert cli_main(["models", "pull", "not a repo"]) == 2
    assert "not a Hugging Face repository id" in capsys.readouterr().err


def test_gated_repo_needs_hf_token_which_stays_off_the_cdn(standin, monkeypatch):
    name = "tiny-coder-q4_k_m.gguf"
    standin.repos[GGUF_REPO].gated_token = "hf_secret"
    with pytest.raises(hub.HubError, match="gated.*HF_TOKEN"):
        hub.pull(GGUF_REPO, [name])
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    model = hub.pull(GGUF_REPO, [name])
    assert model.model_path().name == name
    resolves = [r for r in standin.requests if "/resolve/" in r.path]
    assert resolves[-1].headers.get("authorization") == "Bearer hf_secret"


def test_list_and_rm(standin, capsys):
    assert cli_main(["models", "list"]) == 0
    assert "no pulled models" in capsys.readouterr().out
    hub.pull(REPO)
    assert cli_main(["models", "list", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == REPO and row["complete"]
    assert set(row["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert row["size_bytes"] > 0 and Path(row["path"]).is_dir()
    assert cli_main(["models", "rm", "test-org/other"]) == 2
    assert "no pulled model named 'test-org/other'" in capsys.readouterr().err
    assert cli_main(["models", "rm", "tiny-coder"]) == 0
    assert not hub.repo_folder(REPO).exists()
    assert hub.list_pulled() == []


def test_unpulled_repo_name_gets_the_pull_hint(standin):
    with pytest.raises(hub.HubError, match="codecomplete models pull test-org/never"):
        hub.resolve_model_path("test-org/never")
    assert hub.resolve_model_path("no-such-folder") == "no-such-folder"  # the loader reports it


def test_editor_model_setting_accepts_a_pulled_name(standin):
    from codecomplete.lsp.settings import Settings, apply_settings

    settings, errors = apply_settings(Settings(), {"model": REPO})
    assert "no pulled model" in errors[0] and settings.model == ""
    hub.pull(REPO)
    settings, errors = apply_settings(Settings(), {"model": REPO})
    assert errors == [] and settings.model == REPO
    settings, errors = apply_settings(Settings(), {"model": "tiny-coder"})
    assert errors == [] and settings.model == "tiny-coder"


def test_language_server_loads_a_pulled_model_by_name(standin, capsys):
    from codecomplete.lsp.main import main as lsp_main

    hub.pull(REPO)
    assert lsp_main(["--check", "--model", "tiny-coder"]) == 0
    assert "loaded tiny-coder" in capsys.readouterr().err


def test_missing_huggingface_hub_says_how_to_install(standin, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(hub.HubError, match=r"codecomplete\[hub\]"):
        hub.pull(REPO)
