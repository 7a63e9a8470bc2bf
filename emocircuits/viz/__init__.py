"""Pictures and pages: matplotlib figures, offline circuitsvis views, the HTML report."""

from . import figures
from .circuitsvis_views import View, attention_view, neuron_view, standalone_html, write_html
from .report import build_report, render_report

__all__ = ["View", "attention_view", "build_report", "figures", "neuron_view", "render_report",
           "standalone_html", "write_html"]
