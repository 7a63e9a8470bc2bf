"""Prompt builders (the paper's templates exactly) and left-padded token batches.

Paper templates (exactly as in the authors' code; stage page: docs/stages/prompting.md):

* emotion-instructed: system ``"Always reply in {emotion}.\\nKeep the reply to at most two
  sentences."``, user ``"{scenario}\\n{event}"``;
* neutral: system ``"Keep the reply to at most two sentences."``, same user message.

Chat models get the tokenizer's chat template with the generation prompt (it carries the
BOS: exactly one BOS); base models get a plain-text rendering ending in a continuation
prefix. An optional assistant prefix (e.g. ``"I feel"``) is appended after the template.
Batches are left-padded once here; ``TokenBatch.last_idx`` is then ``-1`` for every row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int

PAPER_EMOTION_SYSTEM = "Always reply in {emotion}.\nKeep the reply to at most two sentences."
PAPER_NEUTRAL_SYSTEM = "Keep the reply to at most two sentences."
PAPER_USER = "{scenario}\n{event}"
# Base models (no chat template): the instruction becomes plain text and the reply a
# first-person continuation.
PLAIN_TEMPLATE = "{system}\n\n{user}\n\nReply:"


@dataclass(frozen=True)
class PromptTemplate:
    """System/user templates; ``{emotion}``, ``{scenario}``, ``{event}`` are filled in."""

    system: str | None = PAPER_EMOTION_SYSTEM
    user: str = PAPER_USER
    plain: str = PLAIN_TEMPLATE

    def render(self, **fields: str) -> tuple[str | None, str]:
        try:
            system = self.system.format(**fields) if self.system is not None else None
            user = self.user.format(**fields)
        except KeyError as e:
            raise KeyError(
                f"prompt template needs field {e.args[0]!r}; given {sorted(fields)}"
            ) from None
        return system, user


EMOTION_TEMPLATE = PromptTemplate(system=PAPER_EMOTION_SYSTEM)
NEUTRAL_TEMPLATE = PromptTemplate(system=PAPER_NEUTRAL_SYSTEM)


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt and what it was built from (for grouping and records)."""

    text: str
    emotion: str | None = None
    skeleton_id: str | None = None
    valence: str | None = None
    theme: str | None = None
    scenario: str | None = None
    event: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def group(self) -> tuple[str | None, str | None]:
        """The scenario–event group key (skeleton_id, valence)."""
        return (self.skeleton_id, self.valence)

    @property
    def key(self) -> str:
        return f"{self.skeleton_id}__{self.valence}__{self.emotion or 'neutral'}"


def _tokenizer(model_or_tokenizer):
    return getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)


def render(
    model_or_tokenizer,
    system: str | None,
    user: str,
    *,
    assistant_prefix: str | None = None,
    chat: bool | None = None,
    plain_template: str = PLAIN_TEMPLATE,
) -> str:
    """One prompt string: chat template (with generation prompt) or plain text."""
    tok = _tokenizer(model_or_tokenizer)
    use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError("chat=True but the tokenizer has no chat template")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": user}
        ]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = plain_template.format(system=system or "", user=user).lstrip()
    if assistant_prefix:
        sep = "" if use_chat or text.endswith((" ", "\n")) else " "
        text = text + sep + assistant_prefix
    return text


def emotion_prompts(
    model_or_tokenizer,
    records: Iterable[Any],
    emotions: Sequence[str],
    *,
    template: PromptTemplate = EMOTION_TEMPLATE,
    valences: Sequence[str] = ("positive", "neutral", "negative"),
    assistant_prefix: str | None = None,
    chat: bool | None = None,
) -> list[Prompt]:
    """Every (record, valence, emotion) with the emotion-instructed template.

    Example::

        >>> prompts = emotion_prompts(model, load_sev("builtin:train")[:2], ["anger", "happiness"])
        >>> len(prompts)                                   # 2 records × 3 valences × 2 emotions
        12
        >>> p = prompts[0]; p.emotion, p.valence, p.group
        ('anger', 'positive', ('work_003', 'positive'))
    """
    out: list[Prompt] = []
    for r in records:
        for v in valences:
            for e in emotions:
                system, user = template.render(emotion=e, scenario=r.scenario, event=r.event[v])
                text = render(model_or_tokenizer, system, user, assistant_prefix=assistant_prefix,
                              chat=chat, plain_template=template.plain)
                out.append(Prompt(text, e, r.skeleton_id, v, r.theme, r.scenario, r.event[v]))
    return out


def neutral_prompts(
    model_or_tokenizer,
    records: Iterable[Any],
    *,
    template: PromptTemplate = NEUTRAL_TEMPLATE,
    valences: Sequence[str] = ("positive", "neutral", "negative"),
    assistant_prefix: str | None = None,
    chat: bool | None = None,
) -> list[Prompt]:
    """Every (record, valence) with the neutral template (no emotion instruction).

    Example::

        >>> test = neutral_prompts(model, load_sev("builtin:test")[:2], assistant_prefix="I feel")
        >>> len(test), test[0].emotion, test[0].text.endswith("I feel")
        (6, None, True)
    """
    out: list[Prompt] = []
    for r in records:
        for v in valences:
            system, user = template.render(scenario=r.scenario, event=r.event[v])
            text = render(model_or_tokenizer, system, user, assistant_prefix=assistant_prefix,
                          chat=chat, plain_template=template.plain)
            out.append(Prompt(text, None, r.skeleton_id, v, r.theme, r.scenario, r.event[v]))
    return out


# ----------------------------------------------------------------------------- batches


@dataclass
class TokenBatch:
    """Left-padded tokens. Row i's real tokens are ``tokens[i, -lengths[i]:]``."""

    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    lengths: Int[torch.Tensor, "batch"]

    @property
    def last_idx(self) -> int:
        return -1

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> TokenBatch:
        return TokenBatch(self.tokens.to(device), self.attention_mask.to(device),
                          self.lengths.to(device))

    def positions(self, idx: Int[torch.Tensor, "batch k"]) -> Int[torch.Tensor, "batch k"]:
        """Map per-row positions in the unpadded prompt (negative = from the end) to columns."""
        width = self.tokens.shape[1]
        pad = (width - self.lengths).unsqueeze(1).to(idx.device)
        cols = torch.where(idx < 0, width + idx, pad + idx)
        if (cols < pad).any() or (cols >= width).any():
            raise IndexError("position index out of the prompt's range")
        return cols


def texts_of(prompts: Sequence[str | Prompt] | str | Prompt) -> list[str]:
    """The text of each prompt (``Prompt.text`` or the string itself); one prompt -> a list of one."""
    if isinstance(prompts, (str, Prompt)):
        prompts = [prompts]
    return [p.text if isinstance(p, Prompt) else p for p in prompts]


def encode(model_or_tokenizer, text: str) -> list[int]:
    """Token ids with exactly one BOS: the template's, or one prepended when missing."""
    tok = _tokenizer(model_or_tokenizer)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def tokenize(
    model_or_tokenizer,
    prompts: Sequence[str | Prompt] | str,
    *,
    device: torch.device | str | None = None,
) -> TokenBatch:
    """Left-pad a list of prompt strings (or ``Prompt``s) into a ``TokenBatch``."""
    tok = _tokenizer(model_or_tokenizer)
    if isinstance(prompts, (str, Prompt)):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("tokenize: no prompts given")
    ids = [encode(tok, p.text if isinstance(p, Prompt) else p) for p in prompts]
    check_context(model_or_tokenizer, [len(x) for x in ids], prompts)
    return pad_ids(model_or_tokenizer, ids, device=device)


class PromptTooLongError(ValueError):
    """A prompt (plus the tokens to generate) does not fit the model's context window."""


def check_context(model, lengths: Sequence[int], prompts: Sequence[Any] | None = None, *,
                  extra: int = 0, what: str = "prompt") -> None:
    """Every ``length + extra`` must fit ``model.cfg.n_ctx``; the first that does not raises
    ``PromptTooLongError`` naming the prompt (its record key, or its opening words). A model
    without ``cfg.n_ctx`` (a bare tokenizer) is not checked."""
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    if not n_ctx:
        return
    for i, n in enumerate(lengths):
        if n + extra > n_ctx:
            p = prompts[i] if prompts is not None else None
            if isinstance(p, Prompt) and p.skeleton_id is not None:
                name = f"record {p.key!r}"
            elif p is not None:
                t = p.text if isinstance(p, Prompt) else str(p)
                name = f"{what} {i} ({t[:60]!r}{'…' if len(t) > 60 else ''})"
            else:
                name = f"{what} {i}"
            plus = f" + {extra} to generate" if extra else ""
            raise PromptTooLongError(f"{name} has {n} tokens{plus}; the model's context is {n_ctx} "
                                     "tokens: shorten the scenario/event or split the text")


def pad_ids(model_or_tokenizer, ids: Sequence[Sequence[int]], *,
            device: torch.device | str | None = None) -> TokenBatch:
    """Left-pad token-id sequences (used as they are: no BOS added) into a ``TokenBatch``."""
    tok = _tokenizer(model_or_tokenizer)
    if len(ids) == 0:
        raise ValueError("pad_ids: no sequences given")
    if any(len(x) == 0 for x in ids):
        raise ValueError("pad_ids: an empty token sequence")
    check_context(model_or_tokenizer, [len(x) for x in ids], what="sequence")
    width = max(len(x) for x in ids)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        tokens[i, width - len(x):] = torch.as_tensor(list(x), dtype=torch.long)
        mask[i, width - len(x):] = 1
    lengths = torch.tensor([len(x) for x in ids])
    if device is None and hasattr(model_or_tokenizer, "cfg"):
        device = model_or_tokenizer.cfg.device
    batch = TokenBatch(tokens, mask, lengths)
    return batch.to(device) if device is not None else batch


def batches(items: Sequence[Any], batch_size: int, *, sort_by_length: Any = None):
    """Yield (indices, items) chunks; with ``sort_by_length`` (key fn) similar lengths go together."""
    order = list(range(len(items)))
    if sort_by_length is not None:
        order.sort(key=lambda i: sort_by_length(items[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, [items[i] for i in idx]
