"""One switch turns every progress bar off: ``set_progress`` and ``EMOCIRCUITS_PROGRESS``."""

from __future__ import annotations

import subprocess
import sys

import emocircuits as ec
from emocircuits import progress as P


def test_switch_and_environment(monkeypatch):
    monkeypatch.setattr(P, "_enabled", None)
    monkeypatch.setenv("EMOCIRCUITS_PROGRESS", "0")
    assert not ec.progress_enabled() and P.tqdm(range(3)).disable
    monkeypatch.setenv("EMOCIRCUITS_PROGRESS", "1")
    assert ec.progress_enabled() and not P.tqdm(range(3), file=sys.stderr).disable
    assert P.tqdm(range(3), disable=True).disable  # a call's own switch still wins
    ec.set_progress(False)
    assert not ec.progress_enabled() and P.tqdm(range(3)).disable
    ec.set_progress(True)
    assert ec.progress_enabled()
    monkeypatch.setattr(P, "_enabled", None)


def test_no_bar_output_when_off(tiny_llama, capsys, monkeypatch):
    monkeypatch.setattr(P, "_enabled", False)
    ec.collect(tiny_llama, ["one prompt", "two prompts"], ("resid_post",), "last")  # progress defaults on
    ec.generate(tiny_llama, ["Hello"], max_new_tokens=2)
    err = capsys.readouterr().err
    assert "it/s" not in err and "%|" not in err


def test_write_prints_a_line(capsys):
    P.tqdm.write("a message")
    assert "a message" in capsys.readouterr().out


def test_every_module_uses_the_switch():
    """No module imports tqdm directly (it would ignore the switch)."""
    out = subprocess.run(["grep", "-rlE", r"^\s*from tqdm(\.auto)? import tqdm", str(P.__file__).rsplit("/", 1)[0]],
                         capture_output=True, text=True).stdout.split()
    assert [p for p in out if not p.endswith("progress.py")] == []
