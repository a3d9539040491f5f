"""GET /ui: the browser console, static files shipped in the package (agent/api/static:
no build step, no CDN, works on a host without internet)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

STATIC = Path(__file__).resolve().parent / "static"
MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Only our own files run: no inline script, no other origin; the page may not be framed.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/ui")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type=MEDIA[".html"], headers=HEADERS)


@router.get("/ui/")
async def page_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/ui/{name}")
async def asset(name: str) -> FileResponse:
    # A fixed set of names (no path separators reach here): nothing outside STATIC.
    files = {p.name: p for p in STATIC.iterdir() if p.suffix in MEDIA}
    if name not in files:
        raise HTTPException(404, "no such file")
    path = files[name]
    return FileResponse(path, media_type=MEDIA[path.suffix], headers=HEADERS)
