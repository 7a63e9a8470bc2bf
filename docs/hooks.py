"""MkDocs hook: docstrings write tensor indexing with brackets (``resid[L][last]``), which
Markdown reads as a reference link ``[text][id]`` and autorefs then reports as a missing
cross-reference. Such pseudo-links (identifiers without a dot, i.e. not a Python object path)
are turned back into their literal text; real cross-references are untouched."""

import re

_AUTOREF = re.compile(r"<autoref (?P<attrs>[^>]*?)>(?P<title>.*?)</autoref>", flags=re.DOTALL)
_IDENT = re.compile(r'identifier="(?P<id>[^"]*)"')


def _literal(m: re.Match) -> str:
    ident = _IDENT.search(m.group("attrs"))
    if ident is None or "." in ident.group("id"):
        return m.group(0)
    return f"[{m.group('title')}][{ident.group('id')}]"


def on_page_content(html, **kwargs):
    return _AUTOREF.sub(_literal, html)
