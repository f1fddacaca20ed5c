"""Loopback servers for the download tests: a plain file server with failure modes, and a tiny Hugging Face Hub.

Both run ``http.server.ThreadingHTTPServer`` (HTTP/1.1) on 127.0.0.1 in a daemon thread and log every
request with the body bytes they sent, so tests can prove what was (not) fetched again::

    with FileServer() as srv:
        url = srv.add("/big.bin", data, stall_after=1 << 20)     # holds the connection after 1 MiB
        ...
        assert srv.requests[-1]["range"] == "bytes=1048576-"

:class:`FileServer` routes answer Range requests (206), and can: cut the connection after N bytes,
stall after N bytes (until :meth:`release`), fail with a status the first N times, or always
answer a status (401/404/...). :class:`FakeHub` speaks the hub protocol that ``huggingface_hub``
uses (environment-notes.md "A local Hugging Face Hub for tests"): ``HEAD/GET …/resolve/<rev>/<path>``
with ``X-Repo-Commit``/``ETag``, LFS-style 302 to another origin (the CDN, a :class:`FileServer`)
with ``X-Linked-Etag``/``X-Linked-Size``, the ``/api/<type>s/<repo>/revision`` and ``tree`` calls
of ``snapshot_download``, 404 ``EntryNotFound``/``RepoNotFound``, and 403 ``GatedRepo``. For uploads
(``HfApi.create_repo`` + ``upload_folder``) it answers ``POST /api/repos/create``, ``/api/validate-yaml``,
``…/preupload/<rev>`` (every file "regular", so contents come inline) and ``…/commit/<rev>`` (the
NDJSON commit; the files land in the repo and each commit is kept in :attr:`FakeHub.commits`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    """How :class:`FileServer` answers one path."""

    body: bytes = b""
    status: int = 200
    content_type: str = "application/octet-stream"
    headers: dict = field(default_factory=dict)
    cut_after: int | None = None
    """Close the connection after this many body bytes, for the first ``cut_times`` GETs."""
    cut_times: int = 1
    stall_after: int | None = None
    """Stop sending after this many body bytes and hold the connection (first GET only)."""
    fail_times: int = 0
    """Answer ``fail_status`` to the first N GETs."""
    fail_status: int = 500
    hits: int = 0


class _Base:
    """A ThreadingHTTPServer on a free loopback port with a request log."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                server._dispatch(self, "GET")

            def do_HEAD(self) -> None:
                server._dispatch(self, "HEAD")

            def do_POST(self) -> None:
                server._dispatch(self, "POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        """Absolute URL of ``path``."""
        return self.base + path

    @property
    def bytes_served(self) -> int:
        """Body bytes written to clients, all requests together."""
        with self._lock:
            return sum(r["sent"] for r in self.requests)

    def release(self) -> None:
        """Let stalled responses end (their connections are closed)."""
        self._released.set()

    def close(self) -> None:
        """Stop serving."""
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- plumbing
    def _log(self, h: BaseHTTPRequestHandler, method: str) -> dict:
        rec = {
            "method": method,
            "path": h.path,
            "range": h.headers.get("Range"),
            "sent": 0,
            "auth": h.headers.get("Authorization"),
        }
        with self._lock:
            self.requests.append(rec)
        return rec

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        rec = self._log(h, method)
        try:
            self.handle(h, method, rec)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def handle(self, h: BaseHTTPRequestHandler, method: str, rec: dict) -> None:
        raise NotImplementedError

    def send(
        self,
        h: BaseHTTPRequestHandler,
        method: str,
        rec: dict,
        status: int,
        body: bytes = b"",
        headers: dict | None = None,
        *,
        cut_after: int | None = None,
        stall_after: int | None = None,
    ) -> None:
        """Send a response; the body optionally cut or stalled part-way."""
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body)))
        if cut_after is not None or stall_after is not None:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        if method == "HEAD":
            return
        limit = min(x for x in (cut_after, stall_after, len(body)) if x is not None)
        pos = 0
        while pos < limit:
            chunk = body[pos : min(limit, pos + 64 * 1024)]
            h.wfile.write(chunk)
            h.wfile.flush()
            pos += len(chunk)
            with self._lock:
                rec["sent"] += len(chunk)
        if stall_after is not None and limit < len(body):
            self._released.wait(60)


class FileServer(_Base):
    """A plain HTTP file server: ``add(path, body, **Route fields)`` returns the URL."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        super().__init__()

    def add(self, path: str, body: bytes = b"", **kw) -> str:
        """Serve ``body`` at ``path`` (see :class:`Route` for the failure modes)."""
        self.routes[path] = Route(body=body, **kw)
        return self.url(path)

    def gets(self, path: str) -> list[dict]:
        """The GET requests made for ``path``."""
        return [r for r in self.requests if r["method"] == "GET" and r["path"] == path]

    def handle(self, h, method, rec) -> None:
        route = self.routes.get(h.path.split("?")[0])
        if route is None:
            return self.send(h, method, rec, 404, b"not found", {"Content-Type": "text/plain"})
        if method == "GET":
            route.hits += 1
        if route.status != 200 or route.hits <= route.fail_times:
            status = route.status if route.status != 200 else route.fail_status
            return self.send(h, method, rec, status, b"error", {"Content-Type": "text/plain", **route.headers})
        body, status = route.body, 200
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = {"Content-Type": route.content_type, "ETag": etag, "Accept-Ranges": "bytes", **route.headers}
        m = re.match(r"bytes=(\d+)-$", h.headers.get("Range") or "")
        if m and h.headers.get("If-Range") in (None, etag):
            start = int(m.group(1))
            if start >= len(body):
                return self.send(h, method, rec, 416, b"", {"Content-Range": f"bytes */{len(body)}"})
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
            body, status = body[start:], 206
        cut = route.cut_after if method == "GET" and route.hits <= route.cut_times else None
        stall = route.stall_after if method == "GET" and route.hits == 1 else None
        self.send(h, method, rec, status, body, headers, cut_after=cut, stall_after=stall)


@dataclass
class _Repo:
    files: dict[str, bytes]
    commit: str
    gated: bool = False


class FakeHub(_Base):
    """A minimal Hugging Face Hub; LFS files (>= ``lfs_min`` bytes) redirect to ``cdn``."""

    def __init__(self, cdn: FileServer, lfs_min: int = 1024) -> None:
        self.cdn = cdn
        self.lfs_min = lfs_min
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.commits: list[dict] = []
        """Commits received: ``{"repo", "summary", "files"}``."""
        super().__init__()

    def add_repo(self, repo_id: str, files: dict[str, bytes], repo_type: str = "dataset", gated: bool = False) -> str:
        """Host a repository; returns its commit hash."""
        commit = hashlib.sha1(repo_id.encode() + "".join(sorted(files)).encode()).hexdigest()
        self.repos[(repo_type, repo_id)] = _Repo(dict(files), commit, gated)
        for body in files.values():
            if len(body) >= self.lfs_min:
                self.cdn.add(f"/lfs/{hashlib.sha256(body).hexdigest()}", body)
        return commit

    def handle(self, h, method, rec) -> None:
        path = h.path.split("?")[0]
        if method == "POST":
            return self._post(h, rec, path, h.rfile.read(int(h.headers.get("Content-Length") or 0)))
        api = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?$", path)
        if api:
            return self._api(h, method, rec, api.group(1)[:-1], api.group(2), api.group(3))
        m = re.match(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if not m:
            return self.send(h, method, rec, 404, b"{}", {"X-Error-Code": "RepoNotFound"})
        repo = self._repo(h, method, rec, "dataset" if m.group(1) else "model", m.group(2))
        if repo is None:
            return
        body = repo.files.get(m.group(4))
        if body is None:
            return self.send(
                h,
                method,
                rec,
                404,
                b"{}",
                {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": repo.commit},
            )
        common = {"X-Repo-Commit": repo.commit, "Content-Type": "application/octet-stream"}
        if len(body) >= self.lfs_min:
            sha = hashlib.sha256(body).hexdigest()
            return self.send(
                h,
                method,
                rec,
                302,
                b"",
                {
                    **common,
                    "Location": self.cdn.url(f"/lfs/{sha}"),
                    "X-Linked-Etag": f'"{sha}"',
                    "X-Linked-Size": len(body),
                    "ETag": f'"{sha}"',
                },
            )
        etag = hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()
        self.send(h, method, rec, 200, body, {**common, "ETag": f'"{etag}"'})

    def _repo(self, h, method, rec, repo_type: str, repo_id: str) -> _Repo | None:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            self.send(
                h,
                method,
                rec,
                404,
                b'{"error":"Repository not found"}',
                {
                    "X-Error-Code": "RepoNotFound",
                    "X-Error-Message": "Repository not found",
                    "Content-Type": "application/json",
                },
            )
        elif repo.gated:
            msg = f"Access to {repo_type} {repo_id} is restricted. You must have access to it and be authenticated."
            self.send(
                h,
                method,
                rec,
                403,
                json.dumps({"error": msg}).encode(),
                {"X-Error-Code": "GatedRepo", "X-Error-Message": msg, "Content-Type": "application/json"},
            )
            return None
        return repo

    def _api(self, h, method, rec, repo_type: str, repo_id: str, what: str) -> None:
        repo = self._repo(h, method, rec, repo_type, repo_id)
        if repo is None:
            return
        if what == "revision":
            body = {"id": repo_id, "sha": repo.commit, "siblings": [{"rfilename": p} for p in sorted(repo.files)]}
        else:
            body = []
            for p, data in sorted(repo.files.items()):
                entry = {"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                if len(data) >= self.lfs_min:
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                body.append(entry)
        self.send(h, method, rec, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _post(self, h, rec, path: str, body: bytes) -> None:
        """The upload calls: create repo, README metadata check, preupload, commit."""

        def answer(obj, status: int = 200) -> None:
            self.send(h, "POST", rec, status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        if path == "/api/validate-yaml":
            return answer({"errors": [], "warnings": []})
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            key = (req.get("type") or "model", repo_id)
            if key not in self.repos:
                self.repos[key] = _Repo({}, hashlib.sha1(repo_id.encode()).hexdigest())
            return answer({"url": f"{self.base}/{repo_id}"})
        m = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)/(preupload|commit)/([^/]+)$", path)
        if not m:
            return answer({"error": f"unknown endpoint {path}"}, 404)
        repo = self._repo(h, "POST", rec, m.group(1)[:-1], m.group(2))
        if repo is None:
            return None
        if m.group(3) == "preupload":
            files = json.loads(body)["files"]
            return answer(
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        added = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
        if any(x["key"] != "header" and x["key"] != "file" for x in lines):
            return answer({"error": "only inline files are supported by this fake hub"}, 400)
        repo.files.update(added)
        repo.commit = hashlib.sha1((repo.commit + "".join(sorted(added))).encode()).hexdigest()
        self.commits.append({"repo": m.group(2), "summary": header["summary"], "files": sorted(added)})
        return answer({"commitUrl": f"{self.base}/{m.group(2)}/commit/{repo.commit}", "commitOid": repo.commit})


class FakeJudge(_Base):
    """An OpenAI-compatible ``POST /v1/chat/completions`` on 127.0.0.1 that judges explanations.

    It reads the two descriptions out of the ICM-Assistant-style prompt and answers the
    ``Criteria | Score`` table with word-overlap scores (Accuracy = Jaccard, Preciseness = share of
    the candidate's words in the reference, Comprehensiveness = share of the reference's words in
    the candidate, Fluency = 100 for a non-empty candidate). ``requests`` logs each request's
    ``auth`` header, JSON ``body`` and the ``scores`` it answered; ``fail_times`` answers 503 first.
    """

    def __init__(self, fail_times: int = 0) -> None:
        self.fail_times = fail_times
        super().__init__()

    def handle(self, h, method, rec) -> None:
        rec["body"] = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))) or b"{}")
        rec["scores"] = None
        headers = {"Content-Type": "application/json"}
        if self.fail_times > 0:
            self.fail_times -= 1
            return self.send(h, method, rec, 503, b'{"error": "busy"}', headers)
        if method != "POST" or h.path != "/v1/chat/completions":
            return self.send(h, method, rec, 404, b'{"error": "not found"}', headers)
        rec["scores"] = self.score(rec["body"]["messages"][-1]["content"])
        table = "| Criteria | Score |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rec["scores"].items())
        reply = {"choices": [{"message": {"role": "assistant", "content": table}}]}
        self.send(h, method, rec, 200, json.dumps(reply).encode(), headers)

    @staticmethod
    def score(prompt: str) -> dict[str, int]:
        """The verdict for one prompt (word overlap of the two descriptions)."""
        ref = re.search(r"Real person's description: (.*?)\n\nAlgorithm's description: ", prompt, re.S)
        cand = prompt.split("Algorithm's description: ")[-1]
        words_ref = set(re.findall(r"[a-z]+", (ref.group(1) if ref else "").lower()))
        words_cand = set(re.findall(r"[a-z]+", cand.lower()))
        both = words_ref & words_cand
        return {
            "Accuracy": round(100 * len(both) / max(1, len(words_ref | words_cand))),
            "Preciseness": round(100 * len(both) / max(1, len(words_cand))),
            "Comprehensiveness": round(100 * len(both) / max(1, len(words_ref))),
            "Fluency": 100 if words_cand else 0,
        }

    @property
    def url(self) -> str:  # type: ignore[override]
        """Base URL up to ``/v1``."""
        return self.base + "/v1"
