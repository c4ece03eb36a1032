"""Self-contained HTML pages (inline CSS, no scripts, no network) from a list of sections."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import pandas as pd

from spineqprep import __version__


@dataclass(frozen=True)
class Section:
    """One report section: ``ident`` is its HTML id (and nav anchor), ``body`` trusted HTML."""

    ident: str
    title: str
    body: str


def render_page(out_path: Path, title: str, sections: Sequence[Section]) -> Path:
    """Write an HTML page with a navigation bar linking the sections."""
    template = Template(resources.files("spineqprep.reports").joinpath("report.html").read_text())
    nav = "".join(f'<a href="#{s.ident}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(f'<section id="{s.ident}">\n<h2>{esc(s.title)}</h2>\n{s.body}\n</section>'
                     for s in sections)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = template.substitute(title=esc(title), version=esc(__version__), nav=nav, body=body,
                               subtitle=esc(f"spineqprep {__version__}, built {stamp}"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page, encoding="utf-8")
    return out_path


def esc(text: Any) -> str:
    """HTML-escape any value."""
    return html.escape(str(text), quote=True)


def is_missing(value: Any) -> bool:
    """True for None, NaN and pandas' NA."""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def fmt_ms(value: Any) -> str:
    """A time in ms with two decimals (``n/a`` when missing)."""
    return "n/a" if is_missing(value) else f"{float(value):.2f}"


def fmt_fraction(value: Any) -> str:
    """A fraction in [0, 1] with three decimals."""
    return "n/a" if is_missing(value) else f"{float(value):.3f}"


def fmt_int(value: Any) -> str:
    """A count."""
    return "n/a" if is_missing(value) else str(int(value))


def fmt_text(value: Any) -> str:
    """Any value as text (``n/a`` when missing)."""
    return "n/a" if is_missing(value) else str(value)


Column = tuple[str, str, Callable[[Any], str]]


def table(frame: pd.DataFrame, columns: Sequence[Column], css_class: str = "") -> str:
    """An HTML table of ``frame``: columns are (field, header, formatter); numbers right-aligned."""
    numeric = {fmt_ms, fmt_fraction, fmt_int}
    head = "".join(f"<th>{esc(header)}</th>" for _, header, _ in columns)
    rows = []
    for record in frame.to_dict("records"):
        cells = "".join(
            f'<td{" class=num" if f in numeric else ""} data-field="{esc(field)}">'
            f"{esc(f(record.get(field)))}</td>"
            for field, _, f in columns)
        rows.append(f"<tr>{cells}</tr>")
    cls = f' class="{esc(css_class)}"' if css_class else ""
    return (f"<table{cls}><thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows)
            + "\n</tbody></table>")


def paragraphs(text: str) -> str:
    """Plain text -> escaped ``<p>`` paragraphs (split on blank lines); lines starting with
    "- " become a bulleted list."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = block.strip().splitlines()
        prose = [ln for ln in lines if not ln.startswith("- ")]
        items = [ln[2:] for ln in lines if ln.startswith("- ")]
        if prose:
            out.append(f"<p>{esc(' '.join(prose))}</p>")
        if items:
            out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")
    return "\n".join(out)


def errors_section(errors: Sequence[str] | None) -> Section:
    """The errors section: each message verbatim, or a line saying there were none."""
    if errors:
        body = "\n".join(f'<pre class="error">{esc(e)}</pre>' for e in errors)
    else:
        body = '<p class="ok">No errors were reported.</p>'
    return Section("errors", "Errors", body)


def methods_section(boilerplate: str | None) -> Section:
    """The methods boilerplate section (text from the workflow), or a note that none exists."""
    body = (paragraphs(boilerplate) if boilerplate and boilerplate.strip()
            else '<p class="note">No methods boilerplate was recorded for this run.</p>')
    return Section("methods", "Methods", body)
