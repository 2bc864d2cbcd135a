"""A stand-in for the Hugging Face hub on 127.0.0.1: enough of its API for huggingface-hub (HF_ENDPOINT pointed
here) to list a repository, HEAD a file and GET it whole or by Range. Every request is logged, so a test can
prove which bytes were fetched. It can cut a download short once, or serve corrupted bytes under the true hash."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandinHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.log: list[dict[str, Any]] = []
        self.cut_at: int | None = None  # the next GET that covers this file offset stops there and hangs up
        self.corrupt = False  # serve one flipped byte in the middle, advertise the true sha256
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StandinHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def gets(self, path_part: str = "/resolve/") -> list[dict[str, Any]]:
        return [r for r in self.log if r["method"] == "GET" and path_part in r["path"]]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # the hub's own log is `hub.log`
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                self._serve(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._serve(body=True)

            def _send(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = True) -> int:
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)
                return len(data) if body else 0

            def _serve(self, body: bool) -> None:
                path = self.path.split("?")[0]
                entry = {"method": self.command, "path": path, "range": self.headers.get("Range"), "sent": 0}
                hub.log.append(entry)
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?(?:/.*)?", path)
                if m:
                    files = hub.repos.get(m.group(1))
                    if files is None:
                        self._send(404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}')
                        return
                    items = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest(),
                              "lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                             for n, d in files.items()]
                    info = {"id": m.group(1), "sha": COMMIT,
                            # the model info's siblings name the LFS hash `sha256`, the tree listing `oid`, as the hub
                            "siblings": [{"rfilename": i["path"], "size": i["size"],
                                          "lfs": {"sha256": i["lfs"]["oid"], "size": i["size"], "pointerSize": 134}}
                                         for i in items]}
                    data = json.dumps(items if m.group(2) == "tree" else info).encode()
                    entry["sent"] = self._send(200, {"Content-Type": "application/json"}, data, body)
                    return
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                data = hub.repos.get(m.group(1), {}).get(m.group(3)) if m else None
                if data is None:
                    self._send(404, {"X-Error-Code": "EntryNotFound"}, b"Entry not found", body)
                    return
                sha = hashlib.sha256(data).hexdigest()
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
                           "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes"}
                if hub.corrupt:
                    mid = len(data) // 2
                    data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
                start = 0
                r = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if r:
                    start, end = int(r.group(1)), int(r.group(2) or len(data) - 1)
                    headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
                    data = data[start:end + 1]
                status = 206 if r else 200
                if not body or hub.cut_at is None or not start <= hub.cut_at < start + len(data):
                    entry["sent"] = self._send(status, headers, data, body)
                    return
                cut, hub.cut_at = hub.cut_at - start, None
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data[:cut])
                self.wfile.flush()
                entry["sent"] = cut
                self.close_connection = True  # hang up mid-body: the client sees a short read

        return Handler


def tiny_catalog_entry(data: bytes, repo: str, filename: str) -> Any:
    """A catalog entry for the tests' tiny MoE (3 layers, 8 experts, top-2) served as `repo`/`filename`."""
    from localmoe.home import catalog

    f = catalog.CatalogFile("F32", filename, len(data), "hub listing", default=True)
    layout = {"architecture": "qwen3moe", "layers": 3, "experts": 8, "experts_per_token": 2,
              "total_params": len(data) / 4, "active_params": len(data) / 16, "context": 4096,
              "hidden": 64, "vocab": 49152, "heads": 4, "kv_heads": 2, "head_dim": 16, "source": "test"}
    return catalog.CatalogEntry("tiny-moe", "hub", "large", "Apache-2.0", "a test MoE", repo=repo, rank=0,
                                layout=layout, files=(f,))
