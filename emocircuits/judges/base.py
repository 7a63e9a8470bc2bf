"""The one judge protocol: texts + target emotions in, labels and per-emotion scores out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from jaxtyping import Float

from ..results import Result


@dataclass
class JudgeResult(Result):
    """What every judge returns.

    ``labels[i]`` is the emotion the judge reads in ``texts[i]`` (or ``None`` when it can
    not tell); ``scores[i, j]`` its score for ``emotions[j]`` (probabilities where the judge
    has them); ``match[i]`` whether text i expresses its target emotion (for classifier
    judges ``labels[i] == targets[i]``; for the LLM judge its binary verdict).
    ``abstained[i]`` says why a judge gave text i no label (e.g. ``"degenerate: longest run
    12"``, ``"low confidence 0.21"``; see ``judges.abstain``) and is None where it labelled
    it; an empty list when the judge does not abstain.
    """

    emotions: tuple[str, ...]
    labels: list[str | None]
    scores: Float[np.ndarray, "n emotion"]
    match: list[bool]
    meta: dict[str, Any] = field(default_factory=dict)
    abstained: list[str | None] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.match)) if self.match else float("nan")

    @property
    def n_abstained(self) -> int:
        """Texts the judge gave no label with a reason (they count as no match)."""
        return sum(r is not None for r in self.abstained)

    @property
    def abstention_rate(self) -> float:
        return self.n_abstained / len(self.labels) if self.labels else float("nan")

    def _summary(self) -> dict[str, str]:
        out = super()._summary()
        judge = self.meta.get("judge") if isinstance(self.meta, dict) else None
        head = {"n": str(len(self.labels)), "accuracy": f"{self.accuracy:.4g}"}
        if judge is not None:
            head["judge"] = repr(str(judge))
        return {**head, **out}

    def to_dataframe(self):
        """One row per text: ``label``, ``match``, ``abstained`` (the reason or None) and
        one score column per emotion."""
        import pandas as pd

        df = pd.DataFrame({"label": self.labels, "match": self.match,
                           "abstained": self.abstained or [None] * len(self.labels)})
        scores = np.asarray(self.scores)
        if scores.ndim == 2 and scores.shape == (len(self.labels), len(self.emotions)):
            for j, e in enumerate(self.emotions):
                df[e] = scores[:, j]
        return df


@runtime_checkable
class Judge(Protocol):
    """Anything with a ``name`` and ``judge(texts, targets) -> JudgeResult``."""

    name: str

    def judge(self, texts: Sequence[str], targets: Sequence[str]) -> JudgeResult: ...
