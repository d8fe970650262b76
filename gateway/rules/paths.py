"""Route path patterns: ``/v1/goals/{id}/generate``, ``/v1/reports/*``, ``/v1/chat/**``."""

from __future__ import annotations

import re


def compile_path(pattern: str) -> re.Pattern[str]:
    """Compile a route path pattern. ``{name}`` and ``*`` match one segment; a final ``**``
    matches the rest of the path, including nothing (``/v1/chat/**`` matches ``/v1/chat``).
    A trailing slash is optional. Raises ``ValueError`` saying what is wrong with ``pattern``."""
    if not pattern.startswith("/"):
        raise ValueError(f"must start with '/', got {pattern!r}")
    if "?" in pattern or "#" in pattern:
        raise ValueError("must not contain '?' or '#': the query string is not part of the path")
    body = pattern[1:]
    body = body[:-1] if body.endswith("/") else body
    segments = body.split("/") if body else []
    parts: list[str] = []
    for i, seg in enumerate(segments):
        if seg == "**":
            if i != len(segments) - 1:
                raise ValueError("'**' may only be the last segment")
            return re.compile("^" + "".join(parts) + "(?:/.*)?$")
        if seg == "*" or re.fullmatch(r"\{[A-Za-z_][A-Za-z0-9_]*\}", seg):
            parts.append("/[^/]+")
        elif "{" in seg or "}" in seg or "*" in seg:
            raise ValueError(f"segment '{seg}' is not a literal, '*', '**' or '{{name}}'")
        elif seg == "":
            raise ValueError("has an empty segment ('//')")
        elif seg in (".", ".."):
            raise ValueError(f"segment '{seg}' is not allowed")
        else:
            parts.append("/" + re.escape(seg))
    return re.compile("^" + "".join(parts) + "/?$")


# A '.' or '..' segment: an upstream that resolves it would serve another route's endpoint
# (/v1/chat/../leads/generate) at this route's price.
DOT_SEGMENT = re.compile(r"(?:^|/)\.\.?(?:/|$)")
