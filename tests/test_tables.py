"""The README's and docs' generated tables match their committed results files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tables():
    spec = importlib.util.spec_from_file_location("tables", ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_committed_table_matches_its_results_file():
    tables = _tables()
    assert tables.stale_documents() == []
    blocks = [
        m["name"]
        for doc in tables.DOCUMENTS
        for m in tables.BLOCK.finditer((ROOT / doc).read_text())
    ]
    assert {"merge-quick", "merge-full", "merge-relative-steps"} <= set(blocks)


def test_a_hand_edited_figure_is_caught():
    tables = _tables()
    text = (ROOT / "README.md").read_text()
    match = next(m for m in tables.BLOCK.finditer(text) if m["name"] == "merge-quick")
    body = match["body"]
    edited = body.replace("(", "(1", 1)  # one figure changed by hand
    assert edited != body
    tampered = text[: match.start("body")] + edited + text[match.end("body") :]
    assert tables.render(tampered, "README.md") == text
