"""Results rendered as self-contained HTML (JS and CSS inlined from the package) and as text."""

from __future__ import annotations

import html

from lmscope.views._html import asset, fragment, json_for_script
from lmscope.views._text import percent, table, visible

__all__ = ["asset", "fragment", "json_for_script", "page", "percent", "table", "visible"]


def page(body: str, title: str = "lmscope") -> str:
    """A standalone HTML page around a view fragment."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1"></head>'
        f"<body>{body}</body></html>\n"
    )
