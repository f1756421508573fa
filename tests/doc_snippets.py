"""The fenced examples of docs/client.md (the README's client, CLI and V2 sections), which the
tests execute as written."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "client.md"


def doc_blocks() -> list[tuple[str, set[str], str]]:
    """(language, tags, code) of every fenced block, in order: "```python oip" is python
    tagged `oip`."""
    blocks, lines = [], DOC.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```") and len(lines[i]) > 3:
            language, *tags = lines[i][3:].split()
            end = lines.index("```", i + 1)
            blocks.append((language, set(tags), "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return blocks
