"""``/dashboard``: a self-contained page (no build step, no external assets)."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from gateway.errors import NotFound

_STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}


async def dashboard(request: web.Request) -> web.Response:
    page = resources.files("gateway.api").joinpath("dashboard.html").read_bytes()
    return web.Response(
        body=page,
        content_type="text/html",
        headers={"Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"},
    )


async def dashboard_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _STATIC:
        raise NotFound(f"no dashboard asset {name!r}")
    body = resources.files("gateway.api").joinpath(name)
    if not body.is_file():
        raise NotFound(f"no dashboard asset {name!r}")
    return web.Response(body=body.read_bytes(), content_type=_STATIC[name])
