"""The README's code examples, extracted verbatim so that tests run exactly what users copy."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(section: str, lang: str = "python") -> str:
    """The first ```lang block under the README heading `## section` (before the next `## `)."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no section '## {section}'"
    block = re.search(rf"^```{lang}\n(.*?)^```$", match.group(1), re.MULTILINE | re.DOTALL)
    assert block, f"README.md section '{section}' has no ```{lang} block"
    return block.group(1)
