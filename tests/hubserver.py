"""A loopback stand-in for the few Hugging Face Hub endpoints saeforge's push and hf:// loads use.

huggingface_hub talks to it when its ENDPOINT points here. Repos live in memory: each branch is a list
of commits, each commit a {path: bytes} snapshot. Small files only: preupload answers "regular", so
files arrive inline (base64) in the commit's NDJSON body and no LFS / Xet upload is involved.

Endpoints: POST /api/repos/create, POST /api/models/R/branch/B, POST /api/models/R/preupload/REV,
POST /api/models/R/commit/REV, POST /api/validate-yaml, GET /api/models/R/revision/REV, GET /api/models/R/tree/REV[/PATH],
HEAD/GET /R/resolve/REV/PATH. Unknown repos and revisions answer 404 with the X-Error-Code the Hub sends.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

API = re.compile(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|revision|tree|branch)/([^/]+)(?:/(.*))?$")
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class FakeHub:
    """The server's state: repos[repo_id][branch] = list of (commit sha, {path: bytes})."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, list[tuple[str, dict[str, bytes]]]]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.commits: list[dict] = []  # each commit's header value (summary, description)
        self.validated: list[str] = []  # README.md texts sent to /api/validate-yaml
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id][revision][-1][1])

    def find(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        branches = self.repos.get(repo_id, {})
        if revision in branches:
            return branches[revision][-1]
        for commits in branches.values():
            for sha, files in commits:
                if sha == revision:
                    return sha, files
        return None


def _sha(files: dict[str, bytes], parent: str) -> str:
    h = hashlib.sha1(parent.encode())
    for path in sorted(files):
        h.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
    return h.hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str, message: str) -> None:
            self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_POST(self) -> None:
            path = urlparse(self.path).path
            hub.requests.append(("POST", path))
            body = self._body()
            if path == "/api/repos/create":
                d = json.loads(body)
                repo_id = f"{d['organization']}/{d['name']}" if d.get("organization") else f"user/{d['name']}"
                if repo_id in hub.repos:
                    return self._json(
                        409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"}
                    )
                hub.repos[repo_id] = {"main": [(_sha({}, ""), {})]}
                return self._json(200, {"url": f"{hub.endpoint}/{repo_id}"})
            if path == "/api/validate-yaml":  # huggingface_hub checks a root README.md's front matter first
                hub.validated.append(json.loads(body)["content"])
                return self._json(200, {"warnings": []})
            m = API.match(path)
            if not m:
                return self._error(404, "EntryNotFound", f"no route {path}")
            repo_id, what, rev = m.group(1), m.group(2), unquote(m.group(3))
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            branches = hub.repos[repo_id]
            if what == "branch":
                if rev in branches:
                    return self._json(409, {"error": "Reference already exists"})
                branches[rev] = list(branches["main"])
                return self._json(200, {})
            if rev not in branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            if what == "preupload":
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._json(200, {"files": modes})
            if what == "commit":
                parent, files = branches[rev][-1]
                files = dict(files)
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        hub.commits.append(item["value"])
                    elif item["key"] == "file":
                        assert item["value"]["encoding"] == "base64", item
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    else:
                        return self._error(
                            400, "BadRequest", f"this test hub only takes inline files, got {item['key']}"
                        )
                sha = _sha(files, parent)
                branches[rev].append((sha, files))
                return self._json(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha})
            return self._error(405, "BadRequest", f"{what} is not a POST route")

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            url = urlparse(self.path)
            hub.requests.append((self.command, url.path))
            m = API.match(url.path)
            if m and m.group(2) in ("revision", "tree"):
                repo_id, rev = m.group(1), unquote(m.group(3))
                if repo_id not in hub.repos:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                found = hub.find(repo_id, rev)
                if found is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                sha, files = found
                if m.group(2) == "revision":
                    siblings = [{"rfilename": p} for p in sorted(files)]
                    return self._json(200, {"id": repo_id, "sha": sha, "siblings": siblings, "private": False})
                under = (m.group(4) or "").strip("/")
                if "cursor" in url.query:  # one page holds everything
                    return self._json(200, [])
                entries = [
                    {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": p}
                    for p, data in sorted(files.items())
                    if not under or p.startswith(under + "/")
                ]
                return self._json(200, entries)
            m = RESOLVE.match(url.path)
            if m:
                repo_id, rev, file = m.group(1), unquote(m.group(2)), unquote(m.group(3))
                if repo_id not in hub.repos:
                    return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                found = hub.find(repo_id, rev)
                if found is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                sha, files = found
                if file not in files:
                    return self._error(404, "EntryNotFound", f"{file} does not exist")
                data = files[file]
                etag = f'"{hashlib.sha1(data).hexdigest()}"'
                return self._send(
                    200, data, {"X-Repo-Commit": sha, "ETag": etag, "Content-Type": "application/octet-stream"}
                )
            return self._error(404, "EntryNotFound", f"no route {url.path}")

    return Handler
