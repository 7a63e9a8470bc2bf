"""Layer-wise emotion probes on labeled utterances (logistic / MLP, last token or mean-pooled),
the zero-shot baseline, persistence over generated tokens, malleability under system prompts
and the SEV check (probes against the logit readout on neutral event prompts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..results import Result
from ..run.engine import Plan, StageContext, Study
from . import common

UTTERANCES = 490  # the builtin set (for the dry-run plan)


@dataclass(frozen=True)
class Config:
    """``[probes]``"""

    classes: tuple[str, ...] | None = None  # None: the run's emotions + neutral
    max_utterances: int | None = None  # None: every utterance (class balance kept when capped)
    # wrapped: the utterance as the chat user message (base models: the text), read at its last
    # token; raw: BOS + utterance, no template, last token
    probe_input: Literal["wrapped", "raw"] = "wrapped"
    kinds: tuple[Literal["logreg", "mlp"], ...] = ("logreg",)  # sweeps; the first one is the main probe
    mean_pool: bool = False  # also a logreg sweep on the raw text's mean-pooled resid_post
    cv: int = 5
    # the layer of the probe that persistence, malleability and SEV use (trained on the train
    # split): "peak" (argmax of the CV accuracy), "onset" (the 95 % onset layer) or a layer
    probe_layer: Literal["peak", "onset"] | int = "peak"
    # how zero_shot_n / persistence_n / malleability_n pick test-split rows: the first n, or n per
    # class spread over topic groups
    sample: Literal["first", "per_class"] = "first"
    zero_shot_n: int = 40
    persistence_n: int = 12
    persistence_tokens: int = 16
    persistence_cv: int = 3  # folds of the per-position probes (at most the openings' groups)
    persistence_keep_hidden: bool = False  # keep the states at every k in the result
    # a second probe trained on the train split wrapped as the chat user message (no system
    # prompt), for malleability and SEV; only when probe_input = "raw" on a chat model
    in_context_probe: bool = False
    malleability_n: int = 0  # test rows under probes.DEFAULT_SYSTEM_PROMPTS; 0: not run
    sev_n: int = 0  # data.test scenarios (× 3 events) for the SEV check; 0: not run
    sev_prefix: str = "I feel"  # assistant prefix the SEV prompts end in

    def __post_init__(self) -> None:
        if self.cv < 2 or self.persistence_cv < 2:
            raise ValueError(f"probes.cv and probes.persistence_cv must be >= 2, got {self.cv}, "
                             f"{self.persistence_cv}")
        if self.max_utterances is not None and self.max_utterances < 2:
            raise ValueError("probes.max_utterances must be >= 2")
        if min(self.zero_shot_n, self.persistence_n, self.malleability_n, self.sev_n) < 0:
            raise ValueError("probes: zero_shot_n, persistence_n, malleability_n and sev_n must be >= 0")
        if self.persistence_tokens < 1:
            raise ValueError("probes.persistence_tokens must be >= 1")
        if not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"probes.kinds must list distinct probe kinds, got {list(self.kinds)}")


@dataclass
class ProbeMalleability(Result):
    """One probe under the system prompts: mean probabilities (and shifts) and accuracy per prompt."""

    n: int
    result: object  # probes.MalleabilityResult
    accuracy: dict  # system prompt name -> accuracy


@dataclass
class ProbesResult(Result):
    """The main probe sweep, the zero-shot baseline, persistence; other sweeps, malleability, SEV."""

    sweep: object  # ProbeSweep (probes.kinds[0], last token)
    zero_shot: object | None = None  # ZeroShotResult
    persistence: object | None = None  # PersistenceResult
    other_sweeps: dict = field(default_factory=dict)  # "mlp_last", "logreg_mean" -> ProbeSweep
    probe_layer: int | None = None  # the layer the probes below are trained at (train split)
    malleability: dict = field(default_factory=dict)  # "probe" / "in_context_probe" -> ProbeMalleability
    sev: object | None = None  # SEVProbeCheck ("probe", "in_context_probe")
    notes: list[str] = field(default_factory=list)

    def headline(self) -> dict:
        from ..probes import transfer_by_band

        sw = self.sweep
        out = {"probe_peak_accuracy": float(sw.accuracy_mean.max()), "probe_peak_layer": sw.peak_layer,
               "probe_chance": sw.chance_uniform, "probe_onset_layer_95": sw.onset_layer(0.95)}
        if sw.test_accuracy is not None:
            out["probe_test_accuracy_at_peak"] = float(sw.test_accuracy[sw.layers.index(sw.peak_layer)])
        for name, o in self.other_sweeps.items():
            out[f"probe_{name}_peak_accuracy"] = float(o.accuracy_mean.max())
            out[f"probe_{name}_peak_layer"] = o.peak_layer
        if self.zero_shot is not None:
            out["zero_shot_accuracy"] = self.zero_shot.accuracy
            out["zero_shot_coverage"] = self.zero_shot.coverage
            out["zero_shot_constrained_accuracy"] = self.zero_shot.constrained_accuracy
        p = self.persistence
        if p is not None and p.transfer_accuracy is not None:
            out["persistence_reference_accuracy"] = p.reference_accuracy
            out.update({f"persistence_{k}": v for k, v in transfer_by_band(p).items()})
        for name, m in self.malleability.items():
            out.update({f"malleability_{name}_accuracy_{sp}": a for sp, a in m.accuracy.items()})
        if self.sev is not None:
            out["sev_auc_readout"] = self.sev.auc_readout
            for name, v in self.sev.probes.items():
                out[f"sev_auc_{name}"] = v.auc
                out[f"sev_pearson_{name}"] = v.pearson
        return out


def run(ctx: StageContext) -> ProbesResult:
    import torch

    from .. import probes as PR
    from ..activations import collect
    from ..data import load_utterances
    from ..data.utterances import UtteranceSet
    from ..models import is_chat_model
    from ..prompts import encode, neutral_prompts
    from ..viz import figures

    model, s = ctx.model, ctx.settings
    bs, L = common.batch_size(ctx), model.cfg.n_layers
    classes = list(s.classes) if s.classes is not None else [*ctx.config.emotions, "neutral"]
    utt = [u for u in load_utterances() if u.label in classes]
    if s.max_utterances is not None and len(utt) > s.max_utterances:  # every k-th row
        step = len(utt) / s.max_utterances
        utt = [utt[int(i * step)] for i in range(s.max_utterances)]
    labels, groups, splits = [u.label for u in utt], [u.group for u in utt], [u.split for u in utt]
    kw = [u.has_keyword for u in utt]
    notes: list[str] = []

    # -- the sweeps: one forward collects the embedding and every layer at the utterance's end
    if s.probe_input == "raw":
        ids, pos = [encode(model, u.text) for u in utt], [[-1]] * len(utt)
    else:
        wrapped = [PR.wrap_utterance(model, u.text) for u in utt]
        ids, pos = [encode(model, w[0]) for w in wrapped], [[w[1]] for w in wrapped]
    layers = [PR.EMBED_LAYER, *range(L)]
    h = PR.hidden_at(model, ids, pos, layers, batch_size=bs, progress=ctx.progress)[:, :, 0]
    split = splits if {"train", "test"} <= set(splits) else None
    sweeps = {f"{kind}_last": PR.probe_layers(h, labels, groups, kind=kind, cv=s.cv, layers=layers,
                                              n_layers=L, split=split, has_keyword=kw, classes=classes,
                                              progress=ctx.progress)
              for kind in s.kinds}
    if s.mean_pool:
        pooled = []
        for i in range(0, len(utt), 64):  # position="all" is [n, layer, pos, d]: a chunk at a time
            a = collect(model, [u.text for u in utt[i:i + 64]], "resid_post", position="all",
                        batch_size=bs, progress=False)
            pooled.append(PR.pool_acts(a["resid_post"], a.lengths, "mean"))
        sweeps["logreg_mean"] = PR.probe_layers(torch.cat(pooled), labels, groups, kind="logreg", pool="mean",
                                                cv=s.cv, n_layers=L, split=split, has_keyword=kw,
                                                classes=classes, progress=ctx.progress)
    sweep = sweeps.pop(f"{s.kinds[0]}_last")
    if s.probe_layer == "peak":
        peak = sweep.peak_layer
    elif s.probe_layer == "onset":
        peak = sweep.onset_layer(0.95)
    else:
        if not PR.EMBED_LAYER <= s.probe_layer < L:
            raise ValueError(f"probes.probe_layer {s.probe_layer} out of range (-1 .. {L - 1})")
        peak = s.probe_layer

    # -- the probe used below: kinds[0] at probe_layer, trained on the train split
    tr = [i for i, sp in enumerate(splits) if sp == "train"] or list(range(len(utt)))
    probe = PR.fit_probe(h[tr, layers.index(peak)], [labels[i] for i in tr], layer=peak, kind=s.kinds[0],
                         classes=classes)
    probes = {"probe": probe}
    if s.in_context_probe:
        if s.probe_input == "raw" and is_chat_model(model):
            probes["in_context_probe"] = PR.fit_in_context_probe(
                model, [utt[i].text for i in tr], [labels[i] for i in tr], layer=peak, kind=s.kinds[0],
                classes=classes, batch_size=bs, progress=ctx.progress)
        else:
            notes.append("in_context_probe: not fitted; the probe already reads the utterance the way "
                         "malleability shows it (probe_input = 'wrapped', or a base model)")

    test = UtteranceSet([u for u in utt if u.split == "test"])

    def pick(n: int) -> list:
        if n <= 0:
            return []
        return list(test.per_class(n, classes)) if s.sample == "per_class" else list(test)[:n]

    # -- zero-shot prompting on test rows
    zrows = pick(s.zero_shot_n)
    zs = (PR.zero_shot(model, [u.text for u in zrows], classes, [u.label for u in zrows], batch_size=bs,
                       progress=ctx.progress) if zrows else None)

    # -- persistence: the probe at every generated token of a continuation
    pers = None
    if s.persistence_n > 0:
        if peak == PR.EMBED_LAYER:
            notes.append("persistence: not run; the probe layer is the embedding")
        else:
            op = pick(s.persistence_n) or utt[: s.persistence_n]
            n_groups = len({u.group for u in op})
            pers = PR.persistence(model, [u.text for u in op], [u.label for u in op], s.persistence_tokens,
                                  layer=peak, probe=probe, groups=[u.group for u in op], classes=classes,
                                  cv=min(s.persistence_cv, n_groups) if n_groups > 1 else 2, batch_size=bs,
                                  keep_hidden=s.persistence_keep_hidden, progress=ctx.progress)

    # -- malleability: the same test rows under each system prompt
    mall = {}
    mrows = pick(s.malleability_n)
    for name, pr in (probes.items() if mrows else ()):
        ml = PR.malleability(model, pr, [u.text for u in mrows], batch_size=bs, progress=ctx.progress)
        mall[name] = ProbeMalleability(len(mrows), ml, PR.malleability_accuracy(ml, [u.label for u in mrows]))

    # -- SEV: the probes on neutral event prompts ending in the prefix, against the readout
    sev = None
    if s.sev_n > 0:
        recs = common.records(ctx, "test", s.sev_n)
        sev = PR.sev_probe_check(model, probes, neutral_prompts(model, recs, assistant_prefix=s.sev_prefix),
                                 batch_size=bs, progress=ctx.progress)

    res = ProbesResult(sweep, zs, pers, sweeps, peak, mall, sev, notes)
    _report(ctx, res, figures)
    return res


def _report(ctx: StageContext, res: ProbesResult, figures) -> None:
    sw, zs = res.sweep, res.zero_shot
    base = {}
    if zs is not None:
        base = {"zero-shot (free reply)": zs.accuracy, "zero-shot (constrained)": zs.constrained_accuracy}
    curves = {f"{sw.kind} probe (group CV)": sw.accuracy_mean}
    if sw.test_accuracy is not None:
        curves[f"{sw.kind} probe (fixed test split)"] = sw.test_accuracy
    for name, o in res.other_sweeps.items():
        if list(o.layers) == list(sw.layers):
            curves[f"{name} (group CV)"] = o.accuracy_mean
    ctx.figure("probe accuracy per layer (−1 = embedding)", "probes.png", figures.probe_accuracy, curves,
               layers=sw.layers, chance=sw.chance_uniform, baselines=base)
    ctx.table("probe summary", ["sweep", "peak layer", "peak accuracy", "95 % onset layer", "chance"],
              [[name, o.peak_layer, float(o.accuracy_mean.max()), o.onset_layer(0.95), o.chance_uniform]
               for name, o in {f"{sw.kind}_{sw.pool}": sw, **res.other_sweeps}.items()])
    if zs is not None:
        ctx.table("zero-shot baseline (test rows)", ["accuracy", "coverage", "constrained accuracy", "n"],
                  [[zs.accuracy, zs.coverage, zs.constrained_accuracy, len(zs.replies)]])
    p = res.persistence
    if p is not None and p.transfer_accuracy is not None:
        ctx.figure("persistence: the probe on each generated token", "persistence.png", figures.sweep_curves,
                   [int(k) for k in p.k], {"transfer (probe of the utterances)": p.transfer_accuracy},
                   xlabel="generated tokens read (k)", title=f"probe accuracy, layer {p.layer}")
    if res.malleability:
        names = next(iter(res.malleability.values())).result.names
        ctx.table("malleability: probe accuracy under each system prompt", ["probe", *names, "n"],
                  [[k, *[m.accuracy[n] for n in names], m.n] for k, m in res.malleability.items()])
    if res.sev is not None:
        ctx.table("SEV neutral prompts: positive vs negative event", ["measure", "AUC", "Pearson with readout"],
                  [["readout", res.sev.auc_readout, None],
                   *[[k, v.auc, v.pearson] for k, v in res.sev.probes.items()]])


def plan(cfg) -> Plan:
    s = cfg.section("probes")
    n = s.max_utterances or UTTERANCES
    k = len([*cfg.emotions, "neutral"]) if s.classes is None else len(s.classes)

    def rows(m: int) -> int:
        return m * k if s.sample == "per_class" else m

    fwd = n * (1 + s.mean_pool + s.in_context_probe) + rows(s.persistence_n) + 3 * rows(s.malleability_n) * (
        1 + s.in_context_probe) + 6 * s.sev_n + 2 * rows(s.zero_shot_n)
    # zero-shot labels (12 new tokens) and persistence continuations decode with their own settings
    tok = rows(s.zero_shot_n) * 12 + rows(s.persistence_n) * s.persistence_tokens
    from ..run.plan import UTTERANCE_FORWARD

    return Plan(forward=UTTERANCE_FORWARD * (fwd + rows(s.zero_shot_n) + rows(s.persistence_n)), decode_tokens=tok,
                what="probes per layer; zero-shot; persistence"
                     + ("; malleability" if s.malleability_n else "") + ("; SEV check" if s.sev_n else ""))


def inputs(cfg) -> list:
    out = list(common.utterance_inputs(cfg))
    if cfg.section("probes").sev_n:
        out += common.sev_inputs("test")(cfg)
    return out


STUDY = Study("probes", "Probes, zero-shot baseline, persistence, malleability", Config, run, plan,
              modules=("emocircuits.probes",), inputs=inputs)
