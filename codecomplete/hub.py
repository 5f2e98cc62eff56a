"""Models pulled from the Hugging Face Hub: `codecomplete models pull/list/rm`, and the
name -> local path resolution that lets `--model` and the editors' `model` setting take
a pulled model by name.

This is the only place codecomplete ever reaches the network, and only when the user runs
`codecomplete models pull`. It goes through `huggingface_hub` (the optional `hub` extra), so
HF_ENDPOINT, HF_HUB_OFFLINE and HF_TOKEN (or a `hf auth login` token) work as with any Hub
client. Resolving a name never imports it and never touches the network.

Cache layout ($CODECOMPLETE_CACHE, default ~/.cache/codecomplete):

    hub/<org>--<name>/
      pulled.json          {"repo", "revision", "commit", "endpoint", "files": {name: {"size", "sha256"|"blob_id"}}}
                           written when every file of a pull is complete and verified
      model/<files>        the repository's files as on the Hub (a GGUF, or config.json +
                           *.safetensors + tokenizer.json)
      partial/<id>.part    an interrupted download, resumed with a Range request by the next pull

Our own partial files (not huggingface_hub's cache) because huggingface_hub >= 1.x downloads
into a process-unique temporary file that it deletes on failure: a pull that is killed or
loses the network would start from byte 0 again.

A pulled model's name is its repository id (`Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF`), or the
part after the slash when no other pulled model shares it (`Qwen2.5-Coder-0.5B-Instruct-GGUF`),
case-insensitive. When one repository holds several pulled GGUF files, `REPO:FILE` picks one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "pulled.json"
MODEL_DIRNAME = "model"
PARTIAL_DIRNAME = "partial"
OFFLINE_MESSAGE = ("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, and `models pull` needs the network: unset it to pull "
                   "(pulled models: codecomplete models list)")
INSTALL_HINT = "pip install 'codecomplete[hub]'  (it adds huggingface_hub)"
# Files a Hugging Face checkpoint folder needs besides its *.safetensors (see models/hf_import.py).
HF_METADATA_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                     "special_tokens_map.json", "model.safetensors.index.json")
# The Hub's own rule for repository ids: namespace/name, letters, digits, - _ . (no "--" or "..").
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_TRUE_VALUES = {"1", "on", "yes", "true"}
_HASH_CHUNK_BYTES = 8 << 20


class HubError(RuntimeError):
    """A pull, list or rm that cannot be done; the message says why and what to do."""


def cache_root() -> Path:
    """$CODECOMPLETE_CACHE, else ~/.cache/codecomplete."""
    env = os.environ.get("CODECOMPLETE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "codecomplete"


def hub_dir() -> Path:
    return cache_root() / "hub"


def is_repo_id(value: str) -> bool:
    return bool(_REPO_ID.match(value)) and "--" not in value and ".." not in value


def check_repo_id(repo: str) -> str:
    repo = repo.strip()
    if not is_repo_id(repo):
        raise HubError(f"{repo!r} is not a Hugging Face repository id (expected ORG/NAME, e.g. "
                       "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF)")
    return repo


def repo_folder(repo: str) -> Path:
    return hub_dir() / check_repo_id(repo).replace("/", "--")


# ---------------------------------------------------------------- what is pulled


@dataclass
class PulledModel:
    repo: str
    folder: Path  # hub/<org>--<name>
    revision: str = ""
    commit: str = ""
    files: dict[str, dict] = field(default_factory=dict)  # name -> {"size": bytes, "sha256" | "blob_id"}
    complete: bool = True  # False: a pull was interrupted before pulled.json was written

    @property
    def model_dir(self) -> Path:
        return self.folder / MODEL_DIRNAME

    @property
    def alias(self) -> str:
        return self.repo.rsplit("/", 1)[-1]

    @property
    def gguf_files(self) -> list[str]:
        return sorted(name for name in self.files if name.endswith(".gguf"))

    @property
    def size_bytes(self) -> int:
        """Bytes on disk: the model's files and any partial download."""
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file() and not p.is_symlink())

    def model_path(self, gguf_name: str | None = None) -> Path:
        """What to load: the GGUF file, or the checkpoint folder."""
        if not self.complete:
            raise HubError(f"{self.repo}: the pull was interrupted; run `codecomplete models pull {self.repo}` "
                           "again to resume it")
        ggufs = self.gguf_files
        if gguf_name is not None:
            matches = [g for g in ggufs if g == gguf_name or Path(g).name == gguf_name]
            if not matches:
                raise HubError(f"{self.repo} has no pulled file {gguf_name!r} (pulled: {', '.join(ggufs) or 'no GGUF'})")
            return self.model_dir / matches[0]
        if any(name.endswith(".safetensors") for name in self.files) or not ggufs:
            return self.model_dir
        if len(ggufs) > 1:
            choices = ", ".join(f"{self.repo}:{g}" for g in ggufs)
            raise HubError(f"{self.repo} holds {len(ggufs)} pulled GGUF files; name one: {choices}")
        return self.model_dir / ggufs[0]


def _read_pulled(folder: Path) -> PulledModel | None:
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
            return PulledModel(repo=meta["repo"], folder=folder, revision=meta.get("revision", ""),
                               commit=meta.get("commit", ""), files=dict(meta.get("files", {})))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged manifest: show the folder as incomplete, `pull` rewrites it
    if not folder.is_dir() or "--" not in folder.name:
        return None
    return PulledModel(repo=folder.name.replace("--", "/", 1), folder=folder, complete=False)


def list_pulled() -> list[PulledModel]:
    """Every model under the hub cache, complete or interrupted, by repository id."""
    root = hub_dir()
    if not root.is_dir():
        return []
    found = (_read_pulled(folder) for folder in sorted(root.iterdir()) if folder.is_dir())
    return sorted((m for m in found if m is not None), key=lambda m: m.repo.lower())


def find_pulled(name: str) -> tuple[PulledModel, str | None] | None:
    """(the pulled model a name means, the GGUF file a `REPO:FILE` name picks), or None."""
    name = name.strip()
    repo_part, _, file_part = name.partition(":")
    if not repo_part or not is_repo_id(repo_part):
        return None
    models = list_pulled()
    exact = [m for m in models if m.repo.lower() == repo_part.lower()]
    if not exact and "/" not in repo_part:
        exact = [m for m in models if m.alias.lower() == repo_part.lower()]
        if len(exact) > 1:
            raise HubError(f"{repo_part!r} names {len(exact)} pulled models: "
                           f"{', '.join(m.repo for m in exact)}; use the full repository id")
    if not exact:
        return None
    return exact[0], (file_part or None)


def resolve_model_path(value: str | Path) -> str:
    """A --model value as a local path: an existing file or folder as given, else the path
    of the pulled model of that name. Anything else comes back unchanged (the loader says
    that the path does not exist), except a repository-like name, which gets the pull hint."""
    text = str(value)
    if not text.strip() or Path(text).expanduser().exists():
        return text
    found = find_pulled(text)
    if found is not None:
        model, gguf_name = found
        return str(model.model_path(gguf_name))
    repo_part = text.partition(":")[0]
    if "/" in repo_part and is_repo_id(repo_part):
        pulled = ", ".join(m.repo for m in list_pulled() if m.complete) or "none"
        raise HubError(f"{text}: no such file or folder, and no pulled model of that name (pulled: {pulled}); "
                       f"to fetch it: codecomplete models pull {repo_part}")
    return text


def remove(name: str) -> PulledModel:
    """Delete a pulled (or interrupted) model's folder; HubError for a name that is not pulled."""
    found = find_pulled(name)
    if found is None:
        known = ", ".join(m.repo for m in list_pulled()) or "none"
        raise HubError(f"no pulled model named {name!r} (pulled: {known})")
    model, gguf_name = found
    if gguf_name is None:
        shutil.rmtree(model.folder)
        return model
    # REPO:FILE removes one GGUF of several and keeps the rest of the pull.
    target = model.model_path(gguf_name)
    relative = target.relative_to(model.model_dir).as_posix()
    target.unlink()
    model.files.pop(relative, None)
    if not model.files:
        shutil.rmtree(model.folder)
    else:
        _write_manifest(model, endpoint=None)
    return model


# ---------------------------------------------------------------- choosing files


@dataclass(frozen=True)
class RemoteFile:
    name: str  # path in the repository
    size: int | None
    sha256: str | None  # LFS files: the content's sha256
    blob_id: str | None  # the git blob id (sha1 of "blob <size>\0" + content)

    @property
    def content_id(self) -> str:
        return self.sha256 or self.blob_id or hashlib.sha1(self.name.encode()).hexdigest()


def _matching(remote: list[RemoteFile], patterns: list[str]) -> list[RemoteFile]:
    """Files whose path matches a glob, else those whose file name does; case-insensitive:
    repositories spell the same quantization Q4_K_M (bartowski) and q4_k_m (Qwen)."""
    lowered = [p.lower() for p in patterns]
    by_path = [f for f in remote if any(fnmatch.fnmatchcase(f.name.lower(), p) for p in lowered)]
    return by_path or [f for f in remote
                       if any(fnmatch.fnmatchcase(f.name.rsplit("/", 1)[-1].lower(), p) for p in lowered)]


def _describe(files: Iterable[RemoteFile]) -> str:
    return "\n".join(f"  {f.name}  ({format_bytes(f.size)})" for f in files)


def choose_files(repo: str, remote: list[RemoteFile], patterns: list[str]) -> list[RemoteFile]:
    """The files a pull fetches: one GGUF, or a safetensors checkpoint with its config and
    tokenizer. Several GGUFs and no --file: HubError listing them (never gigabytes unasked)."""
    ggufs = [f for f in remote if f.name.endswith(".gguf")]
    # the checkpoint is the top-level *.safetensors; subfolders hold other variants (onnx/, original/ ...)
    tensors = [f for f in remote if f.name.endswith(".safetensors") and "/" not in f.name]
    metadata = [f for f in remote if f.name in HF_METADATA_FILES]
    if patterns:
        picked = _matching(remote, patterns)
        if not picked:
            raise HubError(f"{repo}: no file matches {' '.join(patterns)}; its model files are:\n"
                           f"{_describe(ggufs + tensors) or '  (none)'}")
        picked_ggufs = [f for f in picked if f.name.endswith(".gguf")]
        if len(picked_ggufs) > 1:
            raise HubError(f"{repo}: {' '.join(patterns)} matches {len(picked_ggufs)} GGUF files; "
                           f"narrow it to one:\n{_describe(picked_ggufs)}")
        if any(f.name.endswith(".safetensors") for f in picked):
            picked += [f for f in metadata if f not in picked]
        return picked
    if tensors:
        return tensors + metadata
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        example = next((f.name for f in ggufs if "q4_k_m" in f.name.lower()), ggufs[0].name)
        raise HubError(f"{repo} has {len(ggufs)} GGUF files; pick one with --file, e.g. "
                       f"--file '{example}':\n{_describe(ggufs)}")
    raise HubError(f"{repo} has no .safetensors or .gguf weights (codecomplete never loads pickle "
                   "checkpoints such as pytorch_model.bin)")


# ---------------------------------------------------------------- pull


def is_offline() -> bool:
    """huggingface_hub's own rule: HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE, set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE_VALUES


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _import_hub():
    try:
        import huggingface_hub
    except ImportError as e:
        raise HubError(f"`codecomplete models pull` needs huggingface_hub: {INSTALL_HINT}") from e
    return huggingface_hub


def _hub_error(hf, repo: str, revision: str, error: Exception) -> HubError:
    """A huggingface_hub or connection error as one sentence a user can act on."""
    errors = hf.utils  # where every huggingface_hub version exports its error classes
    url = endpoint()
    if isinstance(error, getattr(errors, "GatedRepoError", ())):
        return HubError(f"{repo} is gated: accept its conditions at {url}/{repo} and set HF_TOKEN to a token "
                        "of that account (or run `hf auth login`)")
    if isinstance(error, getattr(errors, "RevisionNotFoundError", ())):
        return HubError(f"{repo} has no revision {revision!r}")
    if isinstance(error, getattr(errors, "RepositoryNotFoundError", ())):
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = " (or it is private: set HF_TOKEN)" if status == 401 else ""
        return HubError(f"no repository {repo} on {url}{hint}")
    if isinstance(error, getattr(errors, "EntryNotFoundError", ())):
        return HubError(f"{repo}: a listed file is missing on the Hub ({error})")
    if isinstance(error, getattr(errors, "OfflineModeIsEnabled", ())):
        return HubError(OFFLINE_MESSAGE)
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status is not None:
        return HubError(f"{url} answered HTTP {status} for {repo}: {str(error).splitlines()[0]}")
    return HubError(f"cannot reach {url} ({type(error).__name__}: {error}); check the network, or HF_ENDPOINT "
                    "if you use a mirror")


def _remote_files(api, repo: str, revision: str) -> tuple[str, list[RemoteFile]]:
    info = api.model_info(repo, revision=revision, files_metadata=True)
    files = []
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        lfs_sha = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        lfs_size = (lfs.get("size") if isinstance(lfs, dict) else getattr(lfs, "size", None)) if lfs else None
        files.append(RemoteFile(sibling.rfilename, sibling.size if sibling.size is not None else lfs_size,
                                lfs_sha, sibling.blob_id))
    if not info.sha:
        raise HubError(f"{endpoint()} gave no commit for {repo}@{revision}")
    return info.sha, files


def _content_matches(path: Path, remote: RemoteFile) -> bool:
    """Whether a file on disk is the remote file: sha256 for LFS files, the git blob id for the others."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return False
    if remote.sha256:
        digest = hashlib.sha256()
    elif remote.blob_id:
        digest = hashlib.sha1(f"blob {size}\0".encode())
    else:
        return True  # nothing to check against but the size
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest() == (remote.sha256 or remote.blob_id)


def _download(repo: str, commit: str, remote: RemoteFile, destination: Path, partial: Path) -> None:
    """One file, resumed from `partial` when a previous pull stopped part-way."""
    from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url, http_get
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo, remote.name, revision=commit, endpoint=endpoint())
    metadata = get_hf_file_metadata(url)
    headers = build_hf_headers()
    # Like huggingface_hub: the token goes to the Hub only, never to the CDN it redirects to.
    if _host(metadata.location) != _host(url):
        headers.pop("authorization", None)
        headers.pop("Authorization", None)
    expected_size = remote.size if remote.size is not None else metadata.size
    partial.parent.mkdir(parents=True, exist_ok=True)
    if partial.exists() and expected_size is not None and partial.stat().st_size > expected_size:
        partial.unlink()  # longer than the file: not a prefix of it
    with open(partial, "ab") as f:
        http_get(metadata.location, f, resume_size=f.tell(), headers=headers, expected_size=expected_size,
                 displayed_filename=remote.name)
    if not _content_matches(partial, remote):
        partial.unlink()
        raise HubError(f"{repo}/{remote.name}: the downloaded bytes do not match the Hub's checksum; "
                       "it was deleted, run the pull again")
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, destination)


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc


def _write_manifest(model: PulledModel, endpoint: str | None) -> None:
    meta = {"repo": model.repo, "revision": model.revision, "commit": model.commit, "files": model.files,
            "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if endpoint:
        meta["endpoint"] = endpoint
    tmp = model.folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, model.folder / MANIFEST_NAME)


def pull(repo: str, patterns: list[str] | None = None, revision: str = "main",
         log: Callable[[str], None] = lambda _: None) -> PulledModel:
    """Fetch a model's files from the Hub into the cache (resuming partial files); its pulled record."""
    repo = check_repo_id(repo)
    patterns = [p for p in (patterns or []) if p.strip()]
    if is_offline():
        raise HubError(OFFLINE_MESSAGE)
    hf = _import_hub()
    api = hf.HfApi(endpoint=endpoint())
    try:
        commit, remote = _remote_files(api, repo, revision)
        chosen = choose_files(repo, remote, patterns)
        folder = repo_folder(repo)
        previous = _read_pulled(folder)
        files = dict(previous.files) if previous is not None and previous.complete else {}
        model = PulledModel(repo=repo, folder=folder, revision=revision, commit=commit, files=files)
        total = sum(f.size or 0 for f in chosen)
        log(f"pulling {repo}@{commit[:12]}: {len(chosen)} file(s), {format_bytes(total)}")
        for remote_file in chosen:
            destination = model.model_dir / remote_file.name
            if destination.is_file() and _content_matches(destination, remote_file):
                log(f"  {remote_file.name}: already here")
            else:
                _download(repo, commit, remote_file, destination,
                          folder / PARTIAL_DIRNAME / f"{remote_file.content_id}.part")
            check = {"sha256": remote_file.sha256} if remote_file.sha256 else {"blob_id": remote_file.blob_id}
            model.files[remote_file.name] = {"size": destination.stat().st_size, **check}
    except HubError:
        raise
    except _network_errors(hf) as e:
        raise _hub_error(hf, repo, revision, e) from e
    except OSError as e:  # a short read that retries could not finish, or the cache is not writable
        raise HubError(f"cannot pull {repo}: {e} (a partial download is kept: run the pull again to resume)") from e
    _write_manifest(model, endpoint())
    shutil.rmtree(folder / PARTIAL_DIRNAME, ignore_errors=True)
    return model


def _network_errors(hf) -> tuple[type[BaseException], ...]:
    """The Hub's HTTP errors and the transport's connection errors, whichever HTTP library
    this huggingface_hub uses (httpx2 or httpx from 1.x on, requests before)."""
    found: list[type[BaseException]] = [hf.utils.HfHubHTTPError, hf.utils.OfflineModeIsEnabled,
                                        ConnectionError, TimeoutError]
    for module_name, class_name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                                    ("requests", "RequestException")):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, class_name):
            found.append(getattr(module, class_name))
    return tuple(found)


def format_bytes(size: int | None) -> str:
    if size is None:
        return "? B"
    if size < 1000:
        return f"{size} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            break
    return f"{size:.1f} {unit}"
