"""Reading what an inner pytest run produced: its JSON report, its terminal output, and
the files its tests wrote. One copy for every acceptance module."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest


def token() -> str:
    """A unique argv marker: processes carrying it are this test's and nobody else's."""
    return f"isotok-{uuid.uuid4().hex[:12]}"


def records(path: Path) -> dict[str, dict[str, Any]]:
    """The JSON report's records by node id; a test recorded twice is an error."""
    doc = json.loads(path.read_text())
    recs = {r["nodeid"]: r for r in doc["tests"]}
    assert len(recs) == len(doc["tests"]), "a test has two records"
    return recs


def seen(base: Path, name: str) -> dict[str, Any]:
    """What inner test ``name`` wrote to its tmp_path (found wherever basetemp put it)."""
    found = sorted(base.rglob(f"seen-{name}.json"))
    assert len(found) == 1, f"expected one seen-{name}.json under {base}, found {found}"
    return json.loads(found[0].read_text())


def section(result: pytest.RunResult, title: str) -> str:
    """The text of one ``____ title ____`` block of the FAILURES/ERRORS output."""
    out, inside = [], False
    for line in result.outlines:
        if re.fullmatch(r"_+ .* _+", line):
            inside = line.strip("_ ").strip() == title
            continue
        if inside and re.match(r"^=+ .* =+$", line):
            break
        if inside:
            out.append(line)
    assert out, f"no section {title!r} in output:\n" + "\n".join(result.outlines)
    return "\n".join(out)


def summary_block(result: pytest.RunResult, title: str) -> list[str]:
    """Lines of a ``---- title ----`` sub-section of the terminal summary."""
    out: list[str] = []
    inside = False
    for line in result.outlines:
        if re.fullmatch(r"[-=]+ .* [-=]+", line):
            if inside:
                break
            inside = line.strip("-= ") == title
            continue
        if inside:
            out.append(line)
    return out
