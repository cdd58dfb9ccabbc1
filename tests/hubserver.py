"""A local stand-in for the Hugging Face hub: the subset of its HTTP API that huggingface_hub's ``HfApi.create_repo``,
``create_branch``, ``upload_folder`` (preupload + commit), ``model_info`` / ``repo_info``, ``list_repo_tree``,
``hf_hub_download`` and ``snapshot_download`` use. Point a process at it with ``HF_ENDPOINT=<stand-in url>``.

No package offers this (PyPI and GitHub were searched: the "mock hub"s there patch huggingface_hub's functions in
process, which would not test that our calls reach the hub as they do in real life), hence this file. Repos live in
memory: ``{repo_id: Repo}``, a repo holding branches -> commit id and commits -> ``{path: bytes}``.

Uploads: the preupload answer decides how each file travels. The real hub answers ``lfs`` for weights
(``*.safetensors``), and with ``hf_xet`` installed (it is, here) huggingface_hub then uploads them through the Xet
storage protocol (a separate CAS service), which this stand-in does not speak. It answers ``regular`` for every file,
so every file travels base64-encoded in the commit itself (``uploadMode`` and the LFS route are the hub's choice, not
ours: our code calls ``upload_folder`` and nothing below it). ``modes`` records what the real hub would have said.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

TOKEN = "hf_standin_write_token"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".png")


def git_blob_id(data: bytes) -> str:
    """The git object id of a file (what the hub calls a regular file's ``oid`` and its ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> str:
        sha = hashlib.sha1(f"{branch}{message}{len(self.commits)}{sorted(files)}".encode()).hexdigest()
        self.commits[sha] = files
        self.branches[branch] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        rev = unquote(rev)
        return self.branches.get(rev) or (rev if rev in self.commits else None)


class HubStandIn:
    """``with HubStandIn() as hub: hub.url``: the server runs in a thread until the block ends."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.modes: dict[str, str] = {}  # path -> upload mode the real hub would answer ("lfs" for weights)
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        """Seed a repo with one commit on main; return its commit id."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private))
            return repo.commit("main", dict(files), "seed")

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(rev)]


def _handler(hub: HubStandIn):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        # -- plumbing ----------------------------------------------------------------------------------------------

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

        def _authed(self) -> bool:
            return self.headers.get("Authorization", "") == f"Bearer {hub.token}"

        def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
            """The repo, or None after answering 404 / 401 (a private repo without the token looks missing)."""
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authed()):
                self._error(401 if repo is not None or not self._authed() else 404,
                            f"Repository Not Found for url: {self.path}.", "RepoNotFound", head)
                return None
            return repo

        def _revision(self, repo_id: str, rev: str, head: bool = False) -> tuple[Repo, str] | None:
            """``(repo, commit id)`` of a revision, or None after answering 404 / 401."""
            repo = self._repo(repo_id, head)
            if repo is None:
                return None
            sha = repo.resolve(rev)
            if sha is None:
                self._error(404, f"Revision Not Found: {rev}", "RevisionNotFound", head)
                return None
            return repo, sha

        # -- verbs -------------------------------------------------------------------------------------------------

        def do_HEAD(self) -> None:
            self._get(head=True)

        def do_GET(self) -> None:
            self._get(head=False)

        def _get(self, head: bool) -> None:
            url = urlsplit(self.path)
            path = url.path
            with hub.lock:
                hub.requests.append(("HEAD" if head else "GET", path))
            m = re.fullmatch(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
            if m:
                return self._resolve(m["repo"], m["rev"], unquote(m["file"]), head)
            m = re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", path)
            if m:
                return self._info(m["repo"], m["rev"] or "main")
            m = re.fullmatch(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path)
            if m:
                return self._tree(m["repo"], m["rev"], unquote(m["sub"] or ""), parse_qs(url.query))
            self._error(404, f"no such endpoint in the hub stand-in: GET {path}")

        def do_POST(self) -> None:
            path = urlsplit(self.path).path
            body = self._body()
            with hub.lock:
                hub.requests.append(("POST", path))
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            if not self._authed():
                return self._error(401, "Invalid credentials in Authorization header")
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            m = re.fullmatch(rf"/api/models/{_REPO}/(?P<op>preupload|commit|branch)/(?P<rev>[^/]+)", path)
            if not m:
                return self._error(404, f"no such endpoint in the hub stand-in: POST {path}")
            repo = self._repo(m["repo"])
            if repo is None:
                return
            if m["op"] == "branch":
                return self._branch(repo, unquote(m["rev"]), json.loads(body or b"{}"))
            if repo.resolve(m["rev"]) is None and not (m["op"] == "commit" and not repo.branches):
                return self._error(404, f"Revision Not Found: {m['rev']}", "RevisionNotFound")
            if m["op"] == "preupload":
                return self._preupload(repo, m["rev"], json.loads(body))
            return self._commit(m["repo"], repo, unquote(m["rev"]), body)

        # -- endpoints ---------------------------------------------------------------------------------------------

        def _create(self, payload: dict) -> None:
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            with hub.lock:
                if repo_id in hub.repos:  # (the hub's answer carries the url too: create_repo(exist_ok) reads it)
                    return self._json(409, {"error": "You already created this model repo",
                                            "url": f"{hub.url}/{repo_id}"})
                private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
                hub.repos[repo_id] = repo = Repo(private=private)
                repo.commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                            "initial commit")
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def _branch(self, repo: Repo, branch: str, payload: dict) -> None:
            with hub.lock:
                if branch in repo.branches:
                    return self._error(409, f"Reference already exists: refs/heads/{branch}")
                start = repo.resolve(payload.get("startingPoint") or "main")
                repo.branches[branch] = start
            self._json(200, {})

        def _validate_yaml(self, payload: dict) -> None:
            """The hub's metadata check of a README.md, for the rules our card must keep."""
            text = payload.get("content", "")
            errors = []
            m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
            try:
                meta = yaml.safe_load(m[1]) if m else {}
            except yaml.YAMLError as e:
                meta, errors = {}, [f"invalid YAML: {e}"]
            if not isinstance(meta, dict):
                errors.append("metadata must be a mapping")
            elif "base_model_relation" in meta:
                if not meta.get("base_model"):
                    errors.append("base_model_relation needs base_model")
                if meta["base_model_relation"] not in ("adapter", "merge", "quantized", "finetune"):
                    errors.append("\"base_model_relation\" must be one of adapter, merge, quantized, finetune")
            for entry in (meta.get("model-index") or []) if isinstance(meta, dict) else []:
                for result in entry.get("results") or []:
                    if not (result.get("task") or {}).get("type") or not (result.get("dataset") or {}).get("type"):
                        errors.append("model-index results need task.type and dataset.type")
                    for metric in result.get("metrics") or []:
                        if not isinstance(metric.get("value"), (int, float)) or not metric.get("type"):
                            errors.append(f"model-index metric {metric} needs a type and a number")
            if errors:
                return self._json(400, {"errors": [{"message": e} for e in errors]})
            self._json(200, {"warnings": []})

        def _preupload(self, repo: Repo, rev: str, payload: dict) -> None:
            current = repo.commits[repo.resolve(rev)]
            out = []
            for f in payload["files"]:
                hub.modes[f["path"]] = "lfs" if f["path"].endswith(_LFS_SUFFIXES) else "regular"
                old = current.get(f["path"])
                out.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                            "oid": git_blob_id(old) if old is not None else None})
            self._json(200, {"files": out, "commitOid": repo.resolve(rev)})

        def _commit(self, repo_id: str, repo: Repo, rev: str, body: bytes) -> None:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            with hub.lock:
                base = repo.resolve(rev)
                files = dict(repo.commits[base]) if base else {}
                message = ""
                for item in lines:
                    key, value = item["key"], item["value"]
                    if key == "header":
                        message = value.get("summary", "")
                    elif key == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif key in ("deletedFile", "deletedFolder"):
                        files = {p: d for p, d in files.items()
                                 if p != value["path"] and not p.startswith(value["path"].rstrip("/") + "/")}
                    else:
                        return self._error(400, f"the hub stand-in stores no {key} (LFS/Xet) content")
                sha = repo.commit(rev if not _is_commit_id(rev) else "main", files, message)
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})

        def _info(self, repo_id: str, rev: str) -> None:
            found = self._revision(repo_id, rev)
            if found is None:
                return
            repo, sha = found
            files = repo.commits[sha]
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                             "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [], "downloads": 0})

        def _tree(self, repo_id: str, rev: str, sub: str, query: dict) -> None:
            found = self._revision(repo_id, rev)
            if found is None:
                return
            repo, sha = found
            prefix = f"{sub.rstrip('/')}/" if sub else ""
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            entries, folders = [], set()
            for p, data in sorted(repo.commits[sha].items()):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix):]
                if "/" in rest and not recursive:
                    folders.add(prefix + rest.split("/")[0])
                    continue
                entries.append({"type": "file", "oid": git_blob_id(data), "size": len(data), "path": p})
            entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
            self._json(200, entries)

        def _resolve(self, repo_id: str, rev: str, file: str, head: bool) -> None:
            found = self._revision(repo_id, rev, head)
            if found is None:
                return
            repo, sha = found
            data = repo.commits[sha].get(file)
            if data is None:
                return self._error(404, f"Entry Not Found: {file}", "EntryNotFound", head)
            self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_id(data)}"',
                                   "Content-Type": "application/octet-stream"}, head=head)

    return Handler


def _is_commit_id(rev: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{40}", rev) is not None
