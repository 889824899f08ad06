"""The chat page at `/` and the files it loads from `/static/` (its script, its style sheet and
the vendored markdown renderer and sanitizer, see tools/vendor_web.py).

Every file is read once when the app is built and answered from memory: a request names one of
a fixed set, never a path on disk. The page runs under a Content-Security-Policy that allows
scripts from this origin only, so even HTML the sanitizer missed cannot run inline script;
`connect-src` stays open because the page may talk to another server (`?base=`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

from rillm.server.errors import APIError

STATIC = Path(__file__).parent / "static"

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".LICENSE": "text/plain; charset=utf-8",
}

PAGE_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src data:",
    "connect-src *",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])


class StaticFile:
    def __init__(self, data: bytes, media_type: str) -> None:
        self.data = data
        self.media_type = media_type
        self.etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'

    def response(self, request: Request, headers: dict[str, str] | None = None) -> Response:
        # no-cache: the browser keeps the file and asks each time; an unchanged one costs a 304.
        common = {"ETag": self.etag, "Cache-Control": "no-cache",
                  "X-Content-Type-Options": "nosniff", **(headers or {})}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=common)
        return Response(self.data, media_type=self.media_type, headers=common)


def static_files() -> dict[str, StaticFile]:
    """Every servable file under static/ by its URL path below /static/ (index.html aside)."""
    files = {}
    for path in sorted(STATIC.rglob("*")):
        media_type = MEDIA_TYPES.get(path.suffix)
        if path.is_file() and media_type and path.name != "index.html":
            files[path.relative_to(STATIC).as_posix()] = StaticFile(path.read_bytes(), media_type)
    return files


def install_page(app: FastAPI) -> None:
    """The page and its files are public; the API key guards the /v1 calls the page makes."""
    page = StaticFile((STATIC / "index.html").read_bytes(), MEDIA_TYPES[".html"])
    files = static_files()
    page_headers = {"Content-Security-Policy": PAGE_POLICY, "Referrer-Policy": "no-referrer"}

    @app.get("/", include_in_schema=False)
    async def chat_page(request: Request) -> Response:
        return page.response(request, page_headers)

    @app.get("/static/{name:path}", include_in_schema=False)
    async def static_file(name: str, request: Request) -> Response:
        file = files.get(name)
        if file is None:
            raise APIError(404, f"no file /static/{name}")
        return file.response(request)
