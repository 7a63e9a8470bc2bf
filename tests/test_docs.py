"""The documentation builds with strict warnings (mkdocs + mkdocstrings from docstrings), and
user-facing text does not refer to the internal method notes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()
    shutil.rmtree(tmp_path / "site", ignore_errors=True)


# User-facing text (docstrings render into the API docs) must not point at the project's
# internal method notes (PAPER_METHOD.md, its "§N" sections) or name a flaw by its bare id
# ("A3", "(A19)", "flaw A3", ", A17)"): docs/method.md describes the flaws in words. The
# paper's own sections are written "Sec. N". GPU names such as "A100" do not match.
_INTERNAL_REF = re.compile(
    r"PAPER_METHOD"
    r"|§\s*\d"                                           # §6.1, §10 A7
    r"|\(A\d{1,2}\)"                                     # (A3), Note (A19):
    r"|^\s*A\d{1,2}:"                                    # A5: at the start of a line
    r"|\bflaws? A\d{1,2}\b"                              # flaw A3
    r"|[,;]\s*A\d{1,2}(?:\s*,\s*A\d{1,2})*\s*\)",        # (..., A17), (§4, A2, A12)
    flags=re.MULTILINE,
)


def _user_facing_files() -> list[Path]:
    return (sorted((ROOT / "emocircuits").rglob("*.py")) + sorted((ROOT / "docs").rglob("*.md"))
            + [ROOT / "README.md"])


@pytest.mark.parametrize("text", [
    "PAPER_METHOD.md §2.4–2.7, Appendix A.", "(PAPER_METHOD §2.6, stage 01", "(§10 A7)",
    "**σ** (§6.2, A5, A19):", "keyword copying (A3); related", "Note (A19): σ is",
    "\nA5: ``resid_post`` at", "colour words instead of emotions: flaw A3)",
    "share the neutral inputs, A17)", "(PAPER_METHOD.md §4, A2, A12)",
])
def test_internal_reference_pattern_catches(text):
    assert _INTERNAL_REF.search(text)


@pytest.mark.parametrize("text", [
    "(paper Sec. 6)", "one A100 (80 GB)", "on an H100 or A10G", "Appendix A.", "A = B:",
    "class A(Result):", "a = x[A1B]", "the method page, docs/method.md",
])
def test_internal_reference_pattern_spares(text):
    assert not _INTERNAL_REF.search(text)


def test_no_internal_method_references():
    hits = [f"{p.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
            for p in _user_facing_files() if p.exists()
            for text in [p.read_text(encoding="utf-8")]
            for m in _INTERNAL_REF.finditer(text)]
    assert not hits, ("user-facing text refers to PAPER_METHOD.md or a bare flaw id; say it in "
                      "words (see docs/method.md, 'Known flaws'):\n" + "\n".join(hits))
