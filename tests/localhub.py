"""A small Hugging Face hub on loopback, for tests of the real `huggingface_hub` and `datasets` clients.

It serves model and dataset repos held in memory (files, commits, branches and tags) through the
endpoints the clients call: repo info (`/api/{models,datasets}/REPO[/revision/REV]`), tree listing
and paths-info, file download (`/REPO/resolve/REV/PATH`, `/datasets/REPO/resolve/...`, HEAD and GET
with ranges) with the headers the client checks (`ETag`, `X-Repo-Commit`, `Content-Length`), and the
upload path of `create_repo` / `upload_folder` (`/api/repos/create`, `preupload` answered with
`uploadMode: regular` so contents travel inline, `commit` as ndjson, `validate-yaml`).

It never sends Xet headers or tree `xetHash`/`lfs` fields, so the clients download and upload over
plain HTTP. Private repos answer 401 without a valid token (like the real hub: `X-Error-Code:
RepoNotFound`); unknown repos 404. Point a client at it with `HF_ENDPOINT=hub.url`.

    with LocalHub() as hub:
        hub.add_repo("org/tiny", folder)           # or a dict {path: bytes}
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp / "hf")}
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional, Union
from urllib.parse import parse_qs, unquote, urlsplit

TOKEN = "hf_localhub_test_token"
API_ACTIONS = {"revision", "tree", "paths-info", "preupload", "commit", "refs", "commits", "parquet", "lfs-files"}
DATE = "2024-01-01T00:00:00.000Z"

Files = Union[dict, str, Path]


def blob_id(data: bytes) -> str:
    """git's blob sha1, which the hub uses as the ETag of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def read_folder(folder: Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Repo:
    def __init__(self, repo_id: str, repo_type: str, private: bool):
        self.id, self.type, self.private = repo_id, repo_type, private
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}

    def commit(self, files: dict[str, bytes], message: str, branch: str = "main") -> str:
        parent = self.refs.get(branch, "")
        h = hashlib.sha1(f"{self.type}/{self.id}\0{parent}\0{message}\0{len(self.commits)}".encode())
        for path in sorted(files):
            h.update(f"{path}\0{blob_id(files[path])}\0".encode())
        sha = h.hexdigest()
        self.commits[sha] = dict(files)
        self.refs[branch] = sha
        return sha

    def resolve(self, rev: str) -> Optional[str]:
        if rev in self.refs:
            return self.refs[rev]
        if rev in self.commits:
            return rev
        return None


class LocalHub:
    """The hub: `add_repo`, `start`/`stop` (or `with`), `url`, `files(repo)`, `requests` (method, path)."""

    def __init__(self, tokens=(TOKEN,)):
        self.tokens = set(tokens)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.url = ""

    # -- content ------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: Files, repo_type: str = "model", private: bool = False,
                 message: str = "initial commit") -> str:
        """Create (or add a commit to) a repo; returns the commit sha. `files`: a folder or {path: bytes}."""
        content = read_folder(Path(files)) if isinstance(files, (str, Path)) else {
            k: (v.encode() if isinstance(v, str) else v) for k, v in files.items()}
        with self.lock:
            repo = self.repos.get((repo_type, repo_id))
            if repo is None:
                repo = self.repos[(repo_type, repo_id)] = Repo(repo_id, repo_type, private)
            return repo.commit(content, message)

    def tag(self, repo_id: str, name: str, sha: str, repo_type: str = "model") -> None:
        self.repos[(repo_type, repo_id)].refs[name] = sha

    def files(self, repo_id: str, repo_type: str = "model", rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[(repo_type, repo_id)]
        return dict(repo.commits[repo.resolve(rev)])

    # -- server -------------------------------------------------------------------------------
    def start(self) -> "LocalHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="localhub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Reply(Exception):
    def __init__(self, status: int, body=None, headers: Optional[dict] = None):
        self.status, self.body, self.headers = status, body, headers or {}


def _error(status: int, code: Optional[str], message: str, **headers) -> _Reply:
    h = {"X-Error-Message": message, **headers}
    if code:
        h["X-Error-Code"] = code
    return _Reply(status, {"error": message}, h)


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- plumbing -----------------------------------------------------------------------------
    def _send(self, status: int, body=None, headers: Optional[dict] = None, head_only: bool = False) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json" if not isinstance(body, bytes) else "application/octet-stream")
        headers.setdefault("Content-Length", str(len(data)))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head_only:
            self.wfile.write(data)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        with self.hub.lock:
            self.hub.requests.append((method, split.path))
        body = self._body() if method == "POST" else b""
        try:
            self._route(method, split.path, parse_qs(split.query), body)
        except _Reply as r:
            self._send(r.status, r.body, r.headers, head_only=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    # -- auth and lookup ----------------------------------------------------------------------
    def _token_ok(self) -> Optional[bool]:
        """None: no token sent; True/False: a valid / an invalid one."""
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        return auth[len("Bearer "):].strip() in self.hub.tokens

    def _check_token(self) -> None:
        if self._token_ok() is False:
            raise _error(401, None, "Invalid credentials in Authorization header")

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        self._check_token()
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            raise _error(404, "RepoNotFound", "Repository not found")
        if repo.private and not self._token_ok():
            raise _error(401, "RepoNotFound", "Invalid username or password.")
        return repo

    def _commit(self, repo: Repo, rev: str) -> str:
        sha = repo.resolve(unquote(rev))
        if sha is None:
            raise _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    def _write_access(self) -> None:
        if not self._token_ok():
            raise _error(401, None, "Invalid username or password." if self._token_ok() is None
                         else "Invalid credentials in Authorization header")

    # -- routes -------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
        segs = [unquote(s) for s in path.strip("/").split("/")]
        if segs[0] == "api":
            self._api(method, segs[1:], query, body)
        repo_type = "model"
        if segs[0] == "datasets":
            repo_type, segs = "dataset", segs[1:]
        for i in (1, 2):
            if len(segs) > i + 2 and segs[i] == "resolve":
                repo = self._repo(repo_type, "/".join(segs[:i]))
                self._file(method, repo, segs[i + 1], "/".join(segs[i + 2:]))
        raise _error(404, None, "Not found")

    def _api(self, method: str, segs: list[str], query: dict, body: bytes) -> None:
        if segs[:2] == ["repos", "create"] and method == "POST":
            self._create(json.loads(body or b"{}"))
        if segs == ["validate-yaml"]:
            raise _Reply(200, {"errors": [], "warnings": []})
        if segs == ["whoami-v2"]:
            self._write_access()
            raise _Reply(200, {"type": "user", "name": "tester", "orgs": [], "auth": {"type": "access_token"}})
        if not segs or segs[0] not in ("models", "datasets") or len(segs) < 2:
            raise _error(404, None, "Not found")
        repo_type = segs[0][:-1]
        rest = segs[1:]
        if len(rest) >= 2 and rest[1] in API_ACTIONS or len(rest) == 1:
            repo_id, tail = rest[0], rest[1:]
        else:
            repo_id, tail = "/".join(rest[:2]), rest[2:]
        repo = self._repo(repo_type, repo_id)
        if not tail:
            self._info(repo, self._commit(repo, "main"))
        action, args = tail[0], tail[1:]
        if action == "revision" and args:
            self._info(repo, self._commit(repo, "/".join(args)))
        if action == "tree" and args:
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            self._tree(repo, self._commit(repo, args[0]), "/".join(args[1:]), recursive)
        if action == "paths-info" and args and method == "POST":
            self._paths_info(repo, self._commit(repo, args[0]), body)
        if action == "preupload" and args and method == "POST":
            self._write_access()
            self._preupload(repo, args[0], json.loads(body))
        if action == "commit" and args and method == "POST":
            self._write_access()
            self._commit_ndjson(repo, args[0], body)
        raise _error(404, None, "Not found")

    def _info(self, repo: Repo, sha: str) -> None:
        files = repo.commits[sha]
        raise _Reply(200, {
            "_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24], "id": repo.id, "author": repo.id.split("/")[0],
            "sha": sha, "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": [], "lastModified": DATE, "createdAt": DATE, "cardData": {},
            "siblings": [{"rfilename": p, "size": len(d), "blobId": blob_id(d)} for p, d in sorted(files.items())],
        })

    @staticmethod
    def _entries(files: dict[str, bytes]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for p, d in sorted(files.items()):
            parts = p.split("/")
            for k in range(1, len(parts)):
                folder = "/".join(parts[:k])
                out.setdefault(folder, {"type": "directory", "oid": blob_id(folder.encode()), "size": 0, "path": folder})
            out[p] = {"type": "file", "oid": blob_id(d), "size": len(d), "path": p}
        return out

    def _tree(self, repo: Repo, sha: str, path: str, recursive: bool) -> None:
        entries = self._entries(repo.commits[sha])
        path = path.strip("/")
        if path and (path not in entries or entries[path]["type"] != "directory"):
            raise _error(404, "EntryNotFound", f"{path} does not exist", **{"X-Repo-Commit": sha})
        prefix = path + "/" if path else ""
        listed = [e for p, e in entries.items() if p.startswith(prefix)
                  and (recursive or "/" not in p[len(prefix):])]
        raise _Reply(200, listed)

    def _paths_info(self, repo: Repo, sha: str, body: bytes) -> None:
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        entries = self._entries(repo.commits[sha])
        raise _Reply(200, [entries[p.strip("/")] for p in paths if p.strip("/") in entries])

    def _file(self, method: str, repo: Repo, rev: str, path: str) -> None:
        sha = self._commit(repo, rev)
        files = repo.commits[sha]
        if path not in files:
            raise _error(404, "EntryNotFound", "Entry not found", **{"X-Repo-Commit": sha})
        data = files[path]
        headers = {"ETag": f'"{blob_id(data)}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and method == "GET":
            start_s, _, end_s = rng[len("bytes="):].split(",")[0].partition("-")
            if start_s == "":
                start, end = max(len(data) - int(end_s), 0), len(data) - 1
            else:
                start, end = int(start_s), min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
            if start >= len(data) and len(data):
                raise _Reply(416, b"", {"Content-Range": f"bytes */{len(data)}", **headers})
            part = data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            raise _Reply(206, part, headers)
        headers["Content-Length"] = str(len(data))
        raise _Reply(200, data, headers)

    # -- uploads ------------------------------------------------------------------------------
    def _create(self, payload: dict) -> None:
        self._write_access()
        name, org = payload.get("name"), payload.get("organization")
        repo_id = f"{org}/{name}" if org else name
        repo_type = payload.get("type") or "model"
        private = payload.get("private") or payload.get("visibility") == "private"
        url = f"{self.hub.url}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
        with self.hub.lock:
            if (repo_type, repo_id) in self.hub.repos:
                raise _error(409, None, "You already created this model repo", **{"Content-Type": "application/json"})
            repo = self.hub.repos[(repo_type, repo_id)] = Repo(repo_id, repo_type, bool(private))
            repo.commit({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial commit")
        raise _Reply(200, {"url": url, "name": repo_id, "id": repo_id})

    def _preupload(self, repo: Repo, rev: str, payload: dict) -> None:
        current = repo.commits[self._commit(repo, rev)]
        out = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                "oid": blob_id(current[f["path"]]) if f["path"] in current else None}
               for f in payload.get("files", [])]
        raise _Reply(200, {"files": out, "commitOid": repo.resolve(unquote(rev))})

    def _commit_ndjson(self, repo: Repo, rev: str, body: bytes) -> None:
        branch = unquote(rev)
        if branch not in repo.refs:
            raise _error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        files = dict(repo.commits[repo.refs[branch]])
        message = "commit"
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary") or message
            elif key == "file":
                raw = value["content"]
                files[value["path"]] = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise _error(400, None, f"this local hub does not accept {key!r} operations")
        with self.hub.lock:
            sha = repo.commit(files, message, branch)
        prefix = "datasets/" if repo.type == "dataset" else ""
        raise _Reply(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{prefix}{repo.id}/commit/{sha}",
                           "pullRequestUrl": None, "hookOutput": []})
