"""Views of what the compiler did: the graph after each pass, what each pass changed, and schedules.

    capture = graph.capture(targets.load("hf:mixtral"))
    render(capture, "html")          # or "me-json", "text", "dot", "svg"
"""
from __future__ import annotations

from moecompile.viz.formats import to_dot, to_me_json, to_svg, to_text
from moecompile.viz.graph import Capture
from moecompile.viz.html import to_html

FORMATS = {"html": ".html", "me-json": ".json", "text": ".txt", "dot": ".dot", "svg": ".svg"}


def format_for(path: str) -> str | None:
    """The format a file name asks for by its suffix, or None."""
    return next((fmt for fmt, suffix in FORMATS.items() if path.lower().endswith(suffix)), None)


def render(capture: Capture, fmt: str, stage: str | None = None) -> str:
    """The file's text in `fmt`; `stage` picks the one stage dot and svg show (default: the last)."""
    if fmt in ("dot", "svg"):
        return (to_dot if fmt == "dot" else to_svg)(capture, stage)
    return {"html": to_html, "me-json": to_me_json, "text": to_text}[fmt](capture)
