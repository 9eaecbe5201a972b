"""The building blocks of `report --html`'s page (`pipeline.report.html`, `pipeline.report.identification`):
escaped text, figures as base64 PNG data URIs, tables, values with their 95% intervals."""

from __future__ import annotations

import base64
import html
import io


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str) -> str:
    return f'<img src="{data_uri(png)}" alt="{esc(alt)}">'


def figure(png: bytes, caption: str) -> str:
    return f"<figure>{img(png, caption)}<figcaption>{esc(caption)}</figcaption></figure>"


def table(header: list[str], rows: list[list[str]], raw: bool = False, css_class: str = "") -> str:
    """An HTML table; cells are escaped unless `raw` (already HTML); `css_class` "wrap" lets cells break long
    words anywhere (paths, hashes), so the table fits the window."""
    cell = (lambda c: c) if raw else esc
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    opening = f'<table class="{esc(css_class)}">' if css_class else "<table>"
    return f"{opening}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(draw, *args) -> bytes:
    """The PNG that `draw(first, target, *rest)` writes, drawn to memory."""
    buf = io.BytesIO()
    draw(*args[:1], buf, *args[1:])
    return buf.getvalue()


def interval(value) -> tuple[float, float] | None:
    """A 95% interval as (lo, hi) from [lo, hi] or {"lo"/"low": .., "hi"/"high": ..}; None otherwise."""
    if isinstance(value, dict):
        value = [value.get("lo", value.get("low")), value.get("hi", value.get("high"))]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return float(value[0]), float(value[1])
    return None


def with_ci(value, ci) -> str:
    """A value (4 decimals) and, on a second line in grey, its 95% interval when there is one; "-" for none."""
    if value is None:
        return "-"
    text = f"{float(value):.4f}"
    bounds = interval(ci)
    if bounds is not None:
        text += f' <span class="ci">[{bounds[0]:.4f}, {bounds[1]:.4f}]</span>'
    return text


__all__ = ["data_uri", "esc", "figure", "img", "interval", "render", "table", "with_ci"]
