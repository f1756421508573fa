"""The fenced examples of README's "Python client, CLI and Open Inference Protocol" section,
which the tests execute as written."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Python client, CLI and Open Inference Protocol"


def _section() -> list[str]:
    lines = README.read_text().splitlines()
    start = lines.index(SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def doc_blocks() -> list[tuple[str, set[str], str]]:
    """(language, tags, code) of every fenced block, in order: "```python oip" is python
    tagged `oip`."""
    blocks, lines = [], _section()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```") and len(lines[i]) > 3:
            language, *tags = lines[i][3:].split()
            end = lines.index("```", i + 1)
            blocks.append((language, set(tags), "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return blocks
