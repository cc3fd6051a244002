"""Text from a run directory or its database, made safe for Streamlit's markdown: a run's name
and what a trainer wrote show as the text they are, never as links, images, colours or formulas."""

from __future__ import annotations

import re
import unicodedata
from typing import Any


def code_span(text: Any) -> str:
    """``text`` as inline code that nothing in it can break out of: a run's name comes from a
    directory anyone may have named (backticks, links, images), and must show as the text it is."""
    text = "".join("\ufffd" if unicodedata.category(c).startswith("C") else c for c in str(text))
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def plain(text: Any) -> str:
    """``text`` for a message that quotes what a run directory or its database holds (paths, event
    messages): what could make a link, an image, a colour or an icon (``[``, ``]``, ``<`` before a
    letter), or a formula (``$``), is escaped, and control characters become spaces."""
    text = "".join(" " if unicodedata.category(c).startswith("C") else c for c in str(text))
    return re.sub(r"([\\\[\]$]|<(?=[A-Za-z]))", r"\\\1", text)
