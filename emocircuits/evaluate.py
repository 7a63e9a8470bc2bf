"""Evaluation shared by every method: accuracy tables and the fluency guard.

* ``accuracy_table(rows)``: accuracy overall, per emotion, per valence and per
  emotion × valence from rows ``{"emotion", "valence", "match"}`` (the paper's 01/3 layout).
* ``fluency(model, prompts, texts)``: the perplexity of each generated text under the
  (unhooked) model given its prompt, exp(−mean log p(token | prefix)), and the repeated-
  n-gram rate, 1 − (#distinct n-grams / #n-grams) over the generated tokens.
* ``evaluate_texts``: judge + fluency for one method's generations, as one result.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .prompts import Prompt, encode
from .results import Result


@dataclass
class AccuracyTable(Result):
    overall: float
    n: int
    by_emotion: dict[str, float]
    by_valence: dict[str, float]
    by_emotion_valence: dict[str, float]  # key "emotion/valence"
    n_abstained: int = 0  # rows the judge gave no label with a reason (counted as no match)

    def format(self, title: str = "") -> str:
        emos = list(self.by_emotion)
        vals = list(self.by_valence)
        head = f"{title:<28}{'overall':>9}" + "".join(f"{e[:9]:>10}" for e in emos) + "".join(
            f"{v[:9]:>10}" for v in vals)
        row = f"{'':<28}{100 * self.overall:>8.1f}%" + "".join(
            f"{100 * self.by_emotion[e]:>9.1f}%" for e in emos) + "".join(
            f"{100 * self.by_valence[v]:>9.1f}%" for v in vals)
        if self.n_abstained:
            row += f"   (judge abstained on {self.n_abstained}/{self.n})"
        return head + "\n" + row

    def to_dataframe(self):
        """One row per group: ``group`` (overall / emotion / valence / emotion_valence),
        ``name`` (``"all"``, the emotion, the valence or ``"emotion/valence"``), ``accuracy``."""
        import pandas as pd

        rows = [("overall", "all", self.overall)]
        for group, d in (("emotion", self.by_emotion), ("valence", self.by_valence),
                         ("emotion_valence", self.by_emotion_valence)):
            rows += [(group, k, float(v)) for k, v in d.items()]
        return pd.DataFrame(rows, columns=["group", "name", "accuracy"])


def accuracy_table(rows: Sequence[dict]) -> AccuracyTable:
    """Accuracy = mean(match) overall and grouped (empty groups are left out); rows with an
    ``abstained`` reason (the judge gave no label) count as no match and in ``n_abstained``."""
    if not rows:
        raise ValueError("accuracy_table: no rows")
    groups: dict[str, dict[str, list[bool]]] = {"e": defaultdict(list), "v": defaultdict(list),
                                                 "ev": defaultdict(list)}
    for r in rows:
        m = bool(r["match"])
        groups["e"][r["emotion"]].append(m)
        if r.get("valence") is not None:
            groups["v"][r["valence"]].append(m)
            groups["ev"][f"{r['emotion']}/{r['valence']}"].append(m)
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    return AccuracyTable(
        overall=mean([bool(r["match"]) for r in rows]), n=len(rows),
        by_emotion={k: mean(v) for k, v in groups["e"].items()},
        by_valence={k: mean(v) for k, v in groups["v"].items()},
        by_emotion_valence={k: mean(v) for k, v in groups["ev"].items()},
        n_abstained=sum(bool(r.get("abstained")) for r in rows),
    )


def repeated_ngram_rate(tokens: Sequence, n: int = 3) -> float:
    """1 − distinct/total over the n-grams of one sequence (0 when shorter than n)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@dataclass
class FluencyResult(Result):
    perplexity: list[float]
    repeated_ngram_rate: list[float]
    n: int = 3

    @property
    def mean_perplexity(self) -> float:
        finite = [p for p in self.perplexity if math.isfinite(p)]
        return float(np.exp(np.mean(np.log(finite)))) if finite else float("nan")

    @property
    def mean_repeated_ngram_rate(self) -> float:
        return float(np.mean(self.repeated_ngram_rate)) if self.repeated_ngram_rate else 0.0

    def summary(self) -> dict:
        return {"perplexity_geomean": self.mean_perplexity,
                "repeated_ngram_rate": self.mean_repeated_ngram_rate, "ngram_n": self.n}

    def _summary(self) -> dict[str, str]:
        return {"n_texts": str(len(self.perplexity)), "perplexity_geomean": f"{self.mean_perplexity:.4g}",
                "repeated_ngram_rate": f"{self.mean_repeated_ngram_rate:.4g}", "n": str(self.n)}

    def to_dataframe(self):
        """One row per text: ``perplexity``, ``repeated_ngram_rate``."""
        import pandas as pd

        return pd.DataFrame({"perplexity": self.perplexity,
                             "repeated_ngram_rate": self.repeated_ngram_rate})


@torch.no_grad()
def fluency(model, prompts: Sequence[str | Prompt] | str | Prompt, texts: Sequence[str] | str, *,
            n: int = 3, batch_size: int = 8, generated_tokens: Sequence[Sequence[int]] | None = None
            ) -> FluencyResult:
    """Perplexity of each text given its prompt under ``model`` as is (call it outside any
    steering context to score under the unsteered model), and the repeated-n-gram rate.
    A bare string (prompt and text) is one pair."""
    if isinstance(prompts, (str, Prompt)):
        prompts = [prompts]
    if isinstance(texts, str):
        texts = [texts]
    if len(prompts) != len(texts):
        raise ValueError(f"fluency: {len(prompts)} prompts but {len(texts)} texts")
    tok = model.tokenizer
    # identical (prompt, continuation) pairs (e.g. the unmodified model's texts, judged against
    # every target) are scored once; only the continuation's positions are unembedded
    pairs: list[tuple[list[int], list[int]]] = []
    for j, (p, t) in enumerate(zip(prompts, texts, strict=True)):
        pid = encode(model, p.text if isinstance(p, Prompt) else p)
        gid = (list(generated_tokens[j]) if generated_tokens is not None
               else tok(t, add_special_tokens=False)["input_ids"])
        pairs.append((pid, gid))
    first: dict[tuple, int] = {}
    uniq: list[int] = []
    for j, (pid, gid) in enumerate(pairs):
        key = (tuple(pid), tuple(gid))
        if key not in first:
            first[key] = len(uniq)
            uniq.append(j)
    scored: list[float] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for s in range(0, len(uniq), batch_size):
        rows = [pairs[j][0] + pairs[j][1] for j in uniq[s:s + batch_size]]
        spans = [(len(pairs[j][0]), len(pairs[j][1])) for j in uniq[s:s + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        # left padding: every continuation ends at the last column; the logits predicting it
        # are the last glen + 1 columns but one
        keep = min(width, max(g for _, g in spans) + 1)
        logits = model(ids.to(model.cfg.device), attention_mask=mask.to(model.cfg.device),
                       logits_to_keep=keep, use_cache=False)
        off = width - logits.shape[1]  # column of logits[:, 0]
        for i, (_, glen) in enumerate(spans):
            if glen == 0:
                scored.append(float("nan"))
                continue
            cols = torch.arange(width - glen - 1, width - 1)
            tgt = ids[i, width - glen:]
            lp = torch.log_softmax(logits[i, cols - off].float(), -1).cpu().gather(-1, tgt[:, None])[:, 0]
            scored.append(float(torch.exp(-lp.mean())))
    ppl = [scored[first[(tuple(pid), tuple(gid))]] for pid, gid in pairs]
    rep = [repeated_ngram_rate(gid, n) for _, gid in pairs]
    return FluencyResult(ppl, rep, n)


@dataclass
class MethodEvaluation(Result):
    """One method's generations judged and guarded."""

    method: str
    accuracy: AccuracyTable
    fluency: dict
    rows: list[dict] = field(default_factory=list)
    readout: dict | None = None  # logit-readout accuracy under the same intervention
    examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "accuracy": self.accuracy.to_dict(),
                "fluency": self.fluency, "readout": self.readout, "examples": self.examples}

    def _summary(self) -> dict[str, str]:
        out = super()._summary()
        out["accuracy"] = f"{self.accuracy.overall:.4g} (n={self.accuracy.n})"
        return out

    def to_dataframe(self):
        """The judged rows, one per text (``emotion``, ``match``, ``label``, ...)."""
        import pandas as pd

        return pd.DataFrame(self.rows)


def evaluate_texts(method: str, prompts: Sequence[Prompt], texts: Sequence[str],
                   targets: Sequence[str], judge, *, model=None,
                   generated_tokens: Sequence[Sequence[int]] | None = None) -> MethodEvaluation:
    """Judge ``texts`` against ``targets`` (valence from each prompt) and, with ``model``,
    add the fluency guard."""
    if not len(prompts) == len(texts) == len(targets):
        raise ValueError(f"evaluate_texts({method!r}): {len(prompts)} prompts, {len(texts)} texts and "
                         f"{len(targets)} targets; they must match one to one")
    res = judge.judge(list(texts), list(targets))
    why = list(getattr(res, "abstained", None) or [None] * len(texts))
    rows = [{"emotion": t, "valence": getattr(p, "valence", None), "match": bool(m),
             "label": lab, "abstained": a, "text": x, "key": getattr(p, "key", None),
             "scenario": getattr(p, "skeleton_id", None)}
            for p, t, m, lab, a, x in zip(prompts, targets, res.match, res.labels, why, texts,
                                          strict=True)]
    flu: dict = {}
    if model is not None:
        fr = fluency(model, prompts, texts, generated_tokens=generated_tokens)
        for r, p, q in zip(rows, fr.perplexity, fr.repeated_ngram_rate, strict=True):
            r["perplexity"], r["repeated_3gram_rate"] = p, q
        flu = fr.summary()
    return MethodEvaluation(method, accuracy_table(rows), flu, rows)


# ============================================================================ one method, judged


def evaluate_intervention(
    model,
    prompts: Sequence[Prompt],
    emotions: Sequence[str],
    make_ctx,
    judge,
    gen_config=None,
    *,
    method: str,
    readout_prompts: Sequence[Prompt] | None = None,
    with_fluency: bool = True,
    n_examples: int = 12,
    logits_processors=None,
) -> MethodEvaluation:
    """Generate on ``prompts`` once per target emotion under ``make_ctx(emotion)`` (a context
    manager, or None for the unmodified model), with ``logits_processors(emotion)`` (called
    after ``make_ctx(emotion)``; a list for ``generate``, or None) when given, judge each text
    against its target, and add

    * fluency under the *unmodified* model (perplexity, repeated-3-gram rate; per text in
      ``rows`` and summarised), when ``with_fluency``;
    * the logit readout on ``readout_prompts`` (prompt + "I feel"-style prefix, same order as
      ``prompts``) under the same context: accuracy = argmax of emotion-word mass is the target;
      ``mean_target_mass`` / ``mean_target_share``: the target's word mass (raw / renormalised
      over the emotions).

    When ``make_ctx`` (and ``logits_processors``) return None for every emotion, the texts are
    generated once and judged against every target (the unmodified model's floor).
    ``gen_config.dtype`` (e.g. "bfloat16") is the precision of all three.
    """
    from .generation import GenerationConfig
    from .models import compute_dtype

    cfg = gen_config or GenerationConfig(max_new_tokens=30)
    with compute_dtype(model, cfg.dtype):  # generation, readout and fluency in one precision
        return _evaluate_intervention(model, prompts, emotions, make_ctx, judge, cfg, method=method,
                                      readout_prompts=readout_prompts, with_fluency=with_fluency,
                                      n_examples=n_examples, logits_processors=logits_processors)


def _evaluate_intervention(model, prompts, emotions, make_ctx, judge, cfg, *, method, readout_prompts,
                           with_fluency, n_examples, logits_processors) -> MethodEvaluation:
    from contextlib import nullcontext

    from .generation import generate
    from .judges.readout import emotion_readout

    allp, texts, toks, targets, ro_rows = [], [], [], [], []
    cache: dict[str, object] = {}
    for e in emotions:
        cm = make_ctx(e)
        procs = logits_processors(e) if logits_processors is not None else None
        plain = cm is None and not procs
        if plain and "gen" in cache:
            g, ro = cache["gen"], cache.get("ro")
        else:
            with cm if cm is not None else nullcontext():
                g = generate(model, list(prompts), cfg, progress=False, logits_processors=procs or ())
                ro = (emotion_readout(model, list(readout_prompts), list(emotions))
                      if readout_prompts is not None else None)
            if plain:
                cache.update(gen=g, ro=ro)
        allp += list(prompts)
        texts += g.texts
        toks += g.tokens
        targets += [e] * len(prompts)
        if ro is not None:
            j = list(ro.emotions).index(e)
            for p, lab, m, sh in zip(readout_prompts, ro.labels, ro.mass[:, j], ro.share[:, j],
                                     strict=True):
                ro_rows.append({"emotion": e, "valence": getattr(p, "valence", None),
                                "match": lab == e, "mass": float(m), "share": float(sh)})
    ev = evaluate_texts(method, allp, texts, targets, judge, model=model if with_fluency else None,
                        generated_tokens=toks if with_fluency else None)
    if ro_rows:
        ro_table = accuracy_table(ro_rows).to_dict()
        ro_table["mean_target_mass"] = float(np.mean([r["mass"] for r in ro_rows]))
        ro_table["mean_target_share"] = float(np.mean([r["share"] for r in ro_rows]))
        ev.readout = ro_table
    ev.fluency["repeated_3gram_rate_mean"] = float(np.mean([repeated_ngram_rate(t, 3) for t in toks]))
    step = max(1, len(ev.rows) // max(1, n_examples))
    ev.examples = [{k: r.get(k) for k in ("emotion", "valence", "text", "match", "perplexity")}
                   for r in ev.rows[::step]]
    return ev


def passes_fluency_guard(ev: MethodEvaluation, reference_perplexity: float, *,
                         max_ratio: float = 3.0, max_repeat: float = 0.3) -> bool:
    """Geometric-mean perplexity ≤ ``max_ratio`` × the unmodified model's and repeated-3-gram
    rate < ``max_repeat``."""
    ppl = ev.fluency.get("perplexity_geomean", float("nan"))
    rep = ev.fluency.get("repeated_3gram_rate_mean", ev.fluency.get("repeated_ngram_rate", 1.0))
    return bool(np.isfinite(ppl) and ppl <= max_ratio * reference_perplexity and rep < max_repeat)


def reference_perplexity(ev: MethodEvaluation) -> float:
    """The fluency reference: the median per-text perplexity of the unmodified model's texts."""
    vals = [r["perplexity"] for r in ev.rows if r.get("perplexity") is not None
            and math.isfinite(r["perplexity"])]
    if not vals:
        raise ValueError(f"{ev.method}: no per-text perplexity (evaluate with the model)")
    return float(np.median(vals))


def fluent_accuracy(ev: MethodEvaluation, reference: float, *, max_ratio: float = 3.0,
                    max_repeat: float = 0.3) -> float:
    """Share of texts judged the target AND fluent (see :func:`emocircuits.stats.fluent`)."""
    from .stats import fluent

    return float(np.mean(fluent(ev.rows, reference, max_ratio=max_ratio, max_repeat=max_repeat)))


def choose_setting(grid: dict, base: MethodEvaluation, *, max_ratio: float = 3.0,
                   max_repeat: float = 0.3) -> tuple[object, bool]:
    """The key of the best setting of ``grid`` (key -> MethodEvaluation) on validation.

    Score: fluent accuracy (judged the target, non-empty, perplexity ≤ ``max_ratio`` × the
    median of the unmodified model's texts ``base``, repeated-3-gram rate < ``max_repeat``),
    then passing the setting-level guard, then raw judge accuracy, then readout accuracy. The second value says whether the chosen
    setting also passes the setting-level guard (:func:`passes_fluency_guard`)."""
    if not grid:
        raise ValueError("choose_setting: empty grid")
    ref = reference_perplexity(base)
    guard = {k: passes_fluency_guard(v, base.fluency["perplexity_geomean"], max_ratio=max_ratio,
                                     max_repeat=max_repeat) for k, v in grid.items()}
    key = max(grid, key=lambda k: (fluent_accuracy(grid[k], ref, max_ratio=max_ratio, max_repeat=max_repeat),
                                   guard[k], grid[k].accuracy.overall,
                                   (grid[k].readout or {}).get("overall", 0.0)))
    return key, guard[key]


# ============================================================================ the comparison


@dataclass
class MethodComparison(Result):
    """Every method's raw and fluent accuracy with 95 % intervals over scenarios, perplexity,
    repetition and n; paired differences of fluent accuracy with permutation p-values; one
    verdict line per comparison. ``reference_perplexity``: median of the unmodified texts."""

    table: list[dict]
    differences: dict  # "circuit − random circuit" -> Estimate
    verdicts: list[str]
    reference_perplexity: float
    max_ratio: float = 3.0
    max_repeat: float = 0.3

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.table)

    def plot(self):
        """Fluent accuracy per method with its interval (``figures.fluent_comparison``): a Figure."""
        from .viz.figures import fluent_comparison

        return fluent_comparison(self.table)


def _paired_rows(a: MethodEvaluation, b: MethodEvaluation, fa: list[bool], fb: list[bool]):
    """Rows of a and b matched by (scenario, valence, target emotion)."""
    from .stats import scenario_of

    def key(r):
        return (scenario_of(r), r.get("valence"), r["emotion"])
    bi = {}
    for r, f in zip(b.rows, fb, strict=True):
        bi.setdefault(key(r), []).append(float(f))
    xa, xb, units = [], [], []
    for r, f in zip(a.rows, fa, strict=True):
        k = key(r)
        if k in bi:
            xa.append(float(f))
            xb.append(float(np.mean(bi[k])))
            units.append(k[0])
    return xa, xb, units


def compare_methods(evaluations: dict[str, MethodEvaluation], *, baseline: str = "none",
                    focus: str = "circuit", against: Sequence[str] = ("random circuit", "prompting", "steering"),
                    max_ratio: float = 3.0, max_repeat: float = 0.3, n_boot: int = 2000,
                    n_perm: int = 10000, seed: int = 0) -> MethodComparison:
    """The method table and verdicts. Methods whose name starts with ``"random circuit"`` are
    pooled into one control (each text's fluent match averaged over the random circuits)."""
    from .stats import bootstrap_mean, fluent, paired_difference, scenario_of, smallest_p

    if baseline not in evaluations:
        raise KeyError(f"compare_methods: no {baseline!r} evaluation (the fluency reference)")
    ref = reference_perplexity(evaluations[baseline])
    flu = {m: fluent(ev.rows, ref, max_ratio=max_ratio, max_repeat=max_repeat) for m, ev in evaluations.items()}
    table = []
    for m, ev in evaluations.items():
        units = [scenario_of(r) for r in ev.rows]
        raw = bootstrap_mean([float(r["match"]) for r in ev.rows], units, n_boot=n_boot, seed=seed)
        fl = bootstrap_mean([float(x) for x in flu[m]], units, n_boot=n_boot, seed=seed)
        ppl = [r.get("perplexity") for r in ev.rows if r.get("perplexity") is not None]
        table.append({"method": m, "fluent_accuracy": fl.value, "fluent_low": fl.low, "fluent_high": fl.high,
                      "accuracy": raw.value, "accuracy_low": raw.low, "accuracy_high": raw.high,
                      "readout_accuracy": (ev.readout or {}).get("overall"),
                      "perplexity_median": float(np.nanmedian(ppl)) if ppl else None,
                      "perplexity_geomean": ev.fluency.get("perplexity_geomean"),
                      "repeated_3gram": ev.fluency.get("repeated_3gram_rate_mean"),
                      "n": raw.n, "n_scenarios": raw.n_units,
                      "n_abstained": sum(bool(r.get("abstained")) for r in ev.rows)})
    # the pooled random control
    rnd = [m for m in evaluations if m.startswith("random circuit")]
    pooled: tuple[MethodEvaluation, list[bool]] | None = None
    if rnd:
        first = evaluations[rnd[0]]
        avg = np.mean([np.asarray(flu[m], dtype=float) for m in rnd], axis=0)
        pooled = (first, list(avg))
    diffs, verdicts = {}, []
    if focus in evaluations:
        for other in against:
            if other == "random circuit":
                if pooled is None:
                    continue
                ob, fo = pooled
                label = f"{focus} − random circuit (mean of {len(rnd)})"
            elif other in evaluations:
                ob, fo = evaluations[other], flu[other]
                label = f"{focus} − {other}"
            else:
                continue
            xa, xb, units = _paired_rows(evaluations[focus], ob, flu[focus], fo)
            if not xa:
                continue
            d = paired_difference(xa, xb, units, n_boot=n_boot, n_perm=n_perm, seed=seed)
            diffs[label] = d
            sig = d.p_value is not None and d.p_value < 0.05  # the interval AND the test agree
            word = ("better than" if d.low > 0 and sig else "worse than" if d.high < 0 and sig
                    else "not distinguishable from")
            p = "p < 0.001" if d.p_value < 0.001 else f"p = {d.p_value:.3f}"
            other_name = label.split(" − ", 1)[1]
            few = (f" — too few scenarios for p < 0.05 (the smallest possible p is {smallest_p(d.n_units):.3f})"
                   if smallest_p(d.n_units) >= 0.05 else "")
            verdicts.append(f"{focus} {word} {other_name}: {100 * d.value:+.1f} points of fluent accuracy "
                            f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}], {p}, n = {d.n} "
                            f"({d.n_units} scenarios){few}")
    return MethodComparison(table, diffs, verdicts, ref, max_ratio, max_repeat)
