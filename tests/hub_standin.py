"""A local HTTP server that answers as the Hugging Face Hub does for the calls
huggingface_hub makes in `codecomplete models pull`:

    GET  /api/models/{repo}/revision/{rev}?blobs=true   sha + siblings (size, blobId, lfs.sha256)
    HEAD /{repo}/resolve/{rev}/{file}                   small files: 200 with ETag, Content-Length,
                                                        X-Repo-Commit; LFS files: 302 to the CDN with
                                                        X-Linked-Etag, X-Linked-Size, X-Repo-Commit
    GET  /{repo}/resolve/{rev}/{file}                   the same, with the body (or the redirect)
    GET  /cdn/{sha256}                                  LFS bodies, with Range support (206)

Errors carry X-Error-Code as the Hub's do (RepoNotFound, RevisionNotFound, GatedRepo,
EntryNotFound). Every request is recorded (method, path, headers) for the tests to check.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "a" * 40
    gated_token: str | None = None  # set: the files need `Authorization: Bearer <token>`


@dataclass
class Stall:
    """Cut a body after `after_bytes`: block until released (a pull that gets killed), or
    close the connection (a network drop the client retries)."""
    after_bytes: int
    close: bool = False
    times: int = 1


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class HubStandIn:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    stalls: dict[str, Stall] = field(default_factory=dict)  # file name -> how to cut its first GET
    corrupt: set[str] = field(default_factory=set)  # file names served with one byte changed
    release: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)

    def start(self) -> str:
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.url

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def body_gets(self, name: str) -> list[Recorded]:
        """The GET requests that fetched a file's bytes (CDN or resolve), in order."""
        digests = {hashlib.sha256(data).hexdigest() for repo in self.repos.values()
                   for file_name, data in repo.files.items() if file_name == name}
        return [r for r in self.requests if r.method == "GET" and (
            r.path.rsplit("/", 1)[-1] == name and "/resolve/" in r.path and not _is_lfs(name)
            or r.path.startswith("/cdn/") and r.path.split("/")[2] in digests)]


def _is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


_API = re.compile(r"^/api/models/(?P<repo>.+?)/revision/(?P<rev>[^/]+)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    # ------------------------------------------------------------ routing

    def _answer(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append(Recorded(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        if m := _API.match(path):
            return self._model_info(m["repo"], m["rev"], body)
        if m := _RESOLVE.match(path):
            return self._resolve(m["repo"], m["rev"], m["file"], body)
        if path.startswith("/cdn/"):
            return self._cdn(path.split("/")[2], body)
        self._error(404, "EntryNotFound", body)

    def _repo(self, name: str, rev: str, body: bool) -> Repo | None:
        repo = self.hub.repos.get(name)
        if repo is None:
            self._error(401 if "authorization" not in {k.lower() for k in self.headers} else 404,
                        "RepoNotFound", body)
            return None
        if rev not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", body)
            return None
        return repo

    def _model_info(self, name: str, rev: str, body: bool) -> None:
        repo = self._repo(name, rev, body)
        if repo is None:
            return
        siblings = []
        for file_name, data in repo.files.items():
            entry = {"rfilename": file_name, "size": len(data), "blobId": git_blob_id(data)}
            if _is_lfs(file_name):
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(entry)
        payload = {"id": name, "modelId": name, "sha": repo.commit, "private": False,
                   "gated": "auto" if repo.gated_token else False, "siblings": siblings}
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)

    def _resolve(self, name: str, rev: str, file_name: str, body: bool) -> None:
        repo = self._repo(name, rev, body)
        if repo is None:
            return
        if repo.gated_token and self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            return self._error(401, "GatedRepo", body)
        data = repo.files.get(file_name)
        if data is None:
            return self._error(404, "EntryNotFound", body)
        common = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes"}
        if _is_lfs(file_name):
            digest = hashlib.sha256(data).hexdigest()
            self._send(302, b"", {**common, "Location": f"{self.hub.url}/cdn/{digest}", "ETag": f'"{git_blob_id(data)}"',
                                  "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data))}, body)
            return
        self._send_bytes(file_name, data, {**common, "ETag": f'"{git_blob_id(data)}"'}, body)

    def _cdn(self, digest: str, body: bool) -> None:
        for repo in self.hub.repos.values():
            for file_name, data in repo.files.items():
                if hashlib.sha256(data).hexdigest() == digest:
                    return self._send_bytes(file_name, data, {"ETag": f'"{digest}"', "Accept-Ranges": "bytes"}, body)
        self._send(404, b"", {}, body)

    # ------------------------------------------------------------ bodies

    def _send_bytes(self, file_name: str, data: bytes, headers: dict[str, str], body: bool) -> None:
        start = 0
        status = 200
        if (rng := self.headers.get("Range")) and (m := re.match(r"bytes=(\d+)-$", rng)):
            start = int(m[1])
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, body)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        if file_name in self.hub.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        part = data[start:]
        stall = self.hub.stalls.get(file_name)
        if not body or stall is None or stall.times <= 0:
            return self._send(status, part, headers, body)
        stall.times -= 1
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(part))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(part[: stall.after_bytes])
        self.wfile.flush()
        self.hub.stalled.set()
        if stall.close:
            self.close_connection = True
            self.connection.shutdown(2)  # the peer sees the body end early
            return
        self.hub.release.wait(60)
        self.close_connection = True

    def _error(self, status: int, code: str, body: bool) -> None:
        message = {"RepoNotFound": "Repository not found", "RevisionNotFound": "Invalid rev id",
                   "GatedRepo": "Access to model is restricted", "EntryNotFound": "Entry not found"}[code]
        self._send(status, json.dumps({"error": message}).encode(),
                   {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}, body)

    def _send(self, status: int, payload: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body and payload:
            self.wfile.write(payload)
