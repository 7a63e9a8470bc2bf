"""The notebooks execute top to bottom (nbclient): the tutorial on SmolLM2 (the library's
functions one by one), the bring-your-own-model notebook on an HF folder; the committed
notebooks are the ones notebooks/build_tutorial.py writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def _builder():
    spec = importlib.util.spec_from_file_location("build_tutorial", ROOT / "notebooks" / "build_tutorial.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_committed_notebooks_are_the_built_ones():
    b = _builder()
    for name, cells in (("tutorial.ipynb", b.CELLS), ("byo_model.ipynb", b.BYO_CELLS)):
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        assert [c.source for c in nb.cells] == [src for _, src in cells], f"rebuild {name}: notebooks/build_tutorial.py"
        assert not _outputs(nb), f"{name} is committed without outputs"


def test_byo_model_notebook_executes(tmp_path):
    b = _builder()
    nb = b.execute(b.build(b.BYO_CELLS), tmp_path, timeout=600)
    outs = _outputs(nb)
    assert not [o for o in outs if o.get("output_type") == "error"]
    assert any("layers" in o.get("text", "") for o in outs)


@pytest.mark.integration
@pytest.mark.slow
def test_tutorial_notebook_executes_on_smollm2(tmp_path, smol):
    b = _builder()
    nb = b.execute(b.build(b.CELLS), tmp_path, timeout=1500)
    outs = _outputs(nb)
    assert not [o for o in outs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outs)
    assert "smollm2-135m-instruct layers: 30" in text and "steered  (ppl" in text and "anger circuit:" in text
    assert "points of fluent accuracy" in text  # the verdicts
    assert sum("image/png" in o.get("data", {}) for o in outs) >= 2
    assert any("fluent_accuracy" in o.get("data", {}).get("text/html", "") for o in outs)  # the table
    md = b.to_markdown(nb, tmp_path / "files", "t")
    assert "```python" in md and "![output 1](files/t_1.png)" in md
