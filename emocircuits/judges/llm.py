"""LLM judge: the paper's gpt-4o-mini rating prompt against any OpenAI-compatible endpoint.

Standard library only (``urllib`` + ``concurrent.futures`` + ``sqlite3``). Configuration
comes from arguments or the environment:

* base URL: ``EMOCIRCUITS_JUDGE_BASE_URL`` or ``OPENAI_BASE_URL``
  (default ``https://api.openai.com/v1``); requests go to ``{base}/chat/completions``
  (``/v1`` is added when the base URL has no path);
* API key: ``EMOCIRCUITS_JUDGE_API_KEY`` or ``OPENAI_API_KEY`` (never logged, never in
  ``repr`` or error messages);
* model: ``EMOCIRCUITS_JUDGE_MODEL`` (default ``gpt-4o-mini``).

Each text is rated with the paper's system + user prompt (the authors' stage 01
wording) at temperature 0. Transient failures (HTTP 5xx, 429, timeouts, connection errors)
are retried with exponential backoff, ``delay_i = min(max_backoff, backoff · 2^i)·(1+U/4)``
(``Retry-After`` honoured); other 4xx are not. An unparseable reply is re-requested
``parse_retries`` times, then counted as ``match=False`` with the reason recorded, as in
the paper. Verdicts are cached in a SQLite file keyed by sha256(base URL + model + prompt
version + messages).

The key stays where it belongs: redirects are never followed (urllib would resend the
``Authorization`` header to the new host; the error names both hosts), and a reply or an
error body that echoes the key is scrubbed before it is logged, raised or cached.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..emotions import EKMAN6
from .base import JudgeResult

__all__ = [
    "SYSTEM_TEMPLATE",
    "USER_TEMPLATE",
    "LLMJudge",
    "LLMJudgeConfigError",
    "LLMJudgeError",
    "build_messages",
    "parse_verdict",
]

logger = logging.getLogger(__name__)

PROMPT_VERSION = "paper-01-v1"  # part of the verdict cache key: bump when the prompt changes


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: the request (and its Authorization header) goes nowhere else."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D401
        src, dst = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        raise LLMJudgeConfigError(
            f"LLMJudge: {src.scheme}://{src.netloc}{src.path} answered HTTP {code} redirecting to "
            f"{dst.scheme}://{dst.netloc}{dst.path}; redirects are not followed (the API key would "
            "travel with the request): set the base URL to the final address")


_OPENER = urllib.request.build_opener(_NoRedirect)

# The paper's judge prompt (the authors' stage 01 wording), lines joined by "\n";
# placeholders are substituted with str.replace so braces in the generated text are left alone.
SYSTEM_TEMPLATE = "\n".join([
    "You are a careful rater.",
    "Given a target emotion and a text,",
    "decide if the text's STYLE matches the target emotion among:",
    "{EMOTIONS}",
    "Focus on tone/attitude, not content valence.",
])
USER_TEMPLATE = "\n".join([
    "Target emotion: {emotion}",
    "Text:",
    "{text}",
    "Decide if the text's STYLE matches the target emotion.",
    "Return a compact JSON with keys exactly:",
    "{",
    '"match": <0 or 1>,',
    '"reason": <short string>',
    "}",
])

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"
ENV_BASE_URL = ("EMOCIRCUITS_JUDGE_BASE_URL", "OPENAI_BASE_URL")
ENV_API_KEY = ("EMOCIRCUITS_JUDGE_API_KEY", "OPENAI_API_KEY")
ENV_MODEL = "EMOCIRCUITS_JUDGE_MODEL"
ENV_CACHE = "EMOCIRCUITS_JUDGE_CACHE"


class LLMJudgeError(RuntimeError):
    """A request to the judge endpoint failed in a way that retrying cannot fix."""


class LLMJudgeConfigError(LLMJudgeError):
    """Missing or rejected configuration (no API key, 401/403/404 from the endpoint)."""


def build_messages(
    text: str, emotion: str, emotions: Sequence[str] = EKMAN6
) -> list[dict[str, str]]:
    """The paper's [system, user] chat messages; ``{EMOTIONS}`` = Python list repr."""
    system = SYSTEM_TEMPLATE.replace("{EMOTIONS}", repr(list(emotions)))
    user = USER_TEMPLATE.replace("{emotion}", emotion).replace("{text}", text)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ------------------------------------------------------------------------------ parsing

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*(.*?)```", re.DOTALL)
_MATCH_RE = re.compile(
    r"""["']?match["']?\s*[:=]\s*["']?\s*(1|0|true|false|yes|no)\b""", re.IGNORECASE
)
_REASON_RE = re.compile(r"""["']?reason["']?\s*:\s*["']?(.*?)["']?\s*[,}]?\s*$""",
                        re.IGNORECASE | re.DOTALL)


def _as_bool(v: Any) -> bool:
    """1/0, true/false, "1"/"0", "true"/"false", "yes"/"no" -> bool; else ValueError."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        s = v.strip().strip("\"'").lower()
        if s in ("1", "true", "yes", "1.0"):
            return True
        if s in ("0", "false", "no", "0.0"):
            return False
    raise ValueError(f"match value {v!r} is not 0/1")


def _json_objects(s: str):
    """Yield each balanced {...} substring (string-aware), leftmost first."""
    for start in [i for i, c in enumerate(s) if c == "{"]:
        depth, in_str, esc = 0, False, False
        for j in range(start, len(s)):
            c = s[j]
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    yield s[start:j + 1]
                    break


def parse_verdict(content: str) -> tuple[bool, str]:
    """(match, reason) from a judge reply: plain JSON, ```json fences, JSON inside
    stray text, or as a last resort a ``"match": 1`` fragment. ValueError if none."""
    if not isinstance(content, str) or not content.strip():
        raise ValueError("empty reply")
    candidates = [m.group(1) for m in _FENCE.finditer(content)] + [content]
    for cand in candidates:
        cand = cand.strip()
        for blob in [cand, *_json_objects(cand)]:
            try:
                obj = json.loads(blob)
            except (json.JSONDecodeError, ValueError):
                continue
            if isinstance(obj, dict):
                key = next((k for k in obj if str(k).strip().lower() == "match"), None)
                if key is not None:
                    reason = next((v for k, v in obj.items()
                                   if str(k).strip().lower() == "reason"), "")
                    return _as_bool(obj[key]), str(reason)
    m = _MATCH_RE.search(content)
    if m:
        tail = content[m.end():]
        r = _REASON_RE.search(tail)
        return _as_bool(m.group(1)), (r.group(1).strip() if r else "")
    raise ValueError("no JSON object with a 'match' key in the reply")


# -------------------------------------------------------------------------------- cache

class _VerdictCache:
    """SQLite verdict store: key -> (match, reason). Thread-safe; each write commits."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        with self._lock:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
            except sqlite3.DatabaseError:  # e.g. a network file system without WAL
                pass
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, model TEXT, "
                "match INTEGER, reason TEXT, created REAL)"
            )
            self._db.commit()

    def get(self, key: str) -> tuple[bool, str] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT match, reason FROM verdicts WHERE key = ?", (key,)).fetchone()
        return (bool(row[0]), row[1] or "") if row else None

    def put(self, key: str, model: str, match: bool, reason: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?)",
                (key, model, int(match), reason, time.time()),
            )
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()


def default_cache_path() -> Path:
    """``$EMOCIRCUITS_JUDGE_CACHE`` or ``$XDG_CACHE_HOME/emocircuits/llm_judge.sqlite``."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emocircuits" / "llm_judge.sqlite"


# ------------------------------------------------------------------------------- client

class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class _Outcome:
    match: bool
    reason: str
    ok: bool  # False: API failure or unparseable reply (counted as match=False)
    requests: int
    cached: bool = False


def _first_env(names: Sequence[str]) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v and v.strip():
            return v.strip()
    return None


def _endpoint(base_url: str) -> str:
    """``{base}/chat/completions``; a bare host gets ``/v1`` first; a full endpoint is kept."""
    base = base_url.strip().rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if urllib.parse.urlparse(base).path in ("", "/"):
        base += "/v1"
    return base + "/chat/completions"


class LLMJudge:
    """Binary style judge via an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    ``judge(texts, targets)``: ``match[i]`` is the model's verdict for ``targets[i]``;
    ``labels[i] = targets[i]`` when matched else ``None``; ``scores[i, j]`` is 1/0 in the
    target's column and NaN elsewhere (the prompt asks about the target only).
    ``meta``: model, n_requests, n_cache_hits, n_failed, failures, reasons.
    """

    name = "llm"

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        emotions: Sequence[str] = EKMAN6,
        temperature: float = 0.0,
        max_tokens: int | None = 200,
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        parse_retries: int = 2,
        concurrency: int = 8,
        cache: bool | str | Path = True,
    ) -> None:
        key = api_key if api_key is not None else _first_env(ENV_API_KEY)
        if not key:
            raise LLMJudgeConfigError(
                "LLMJudge: no API key. Set the environment variable "
                f"{ENV_API_KEY[0]} (or {ENV_API_KEY[1]}), or pass api_key=. "
                "A local server without auth accepts any non-empty value."
            )
        self.__key = key
        self.model = model or os.environ.get(ENV_MODEL, "").strip() or DEFAULT_MODEL
        self.base_url = (base_url or _first_env(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/")
        self.url = _endpoint(self.base_url)
        self.emotions = tuple(emotions)
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.parse_retries = int(parse_retries)
        self.concurrency = max(1, int(concurrency))
        if cache is True:
            self._cache: _VerdictCache | None = _VerdictCache(default_cache_path())
        elif cache is False or cache is None:
            self._cache = None
        else:
            self._cache = _VerdictCache(Path(cache).expanduser())

    def __repr__(self) -> str:
        cache = self._cache.path if self._cache else None
        return (f"LLMJudge(model={self.model!r}, url={self.url!r}, api_key='***', "
                f"concurrency={self.concurrency}, cache={str(cache) if cache else None!r})")

    __str__ = __repr__

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("LLMJudge holds an API key and is not picklable")

    # -- helpers -----------------------------------------------------------------------
    def _scrub(self, s: str) -> str:
        return s.replace(self.__key, "***") if self.__key else s

    def cache_key(self, messages: list[dict[str, str]]) -> str:
        """sha256 over the endpoint, the model name, the prompt version and the exact messages."""
        blob = json.dumps({"url": self.url, "model": self.model, "prompt_version": PROMPT_VERSION,
                           "messages": messages}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        d = min(self.max_backoff, self.backoff * (2.0 ** attempt)) * (1 + 0.25 * random.random())
        if retry_after is not None:
            d = max(d, min(retry_after, self.max_backoff))
        return d

    def _post(self, messages: list[dict[str, str]]) -> str:
        """One HTTP request; returns the reply content. Raises _Retryable / LLMJudgeError."""
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = int(self.max_tokens)
        req = urllib.request.Request(
            self.url, data=json.dumps(body).encode("utf-8"), method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json",
                     "Authorization": f"Bearer {self.__key}"},
        )
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except LLMJudgeConfigError:
            raise
        except urllib.error.HTTPError as e:
            try:
                detail = self._scrub(e.read(300).decode("utf-8", "replace"))
            except Exception:  # noqa: BLE001 - the body is only for the message
                detail = ""
            code = int(e.code)
            if code == 429 or code >= 500:
                ra = e.headers.get("Retry-After") if e.headers else None
                try:
                    retry_after = float(ra) if ra is not None else None
                except ValueError:
                    retry_after = None
                raise _Retryable(f"http-{code}", retry_after) from None
            msg = f"LLMJudge: HTTP {code} from {self.url}: {detail.strip()[:200]}"
            if code in (401, 403, 404):
                raise LLMJudgeConfigError(
                    msg + " (check the API key variable, base URL and model name)") from None
            raise LLMJudgeError(msg) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise _Retryable(f"{type(e).__name__}") from None
        except urllib.error.URLError as e:
            raise _Retryable(f"connection-error: {self._scrub(str(e.reason))[:120]}") from None
        except OSError as e:
            raise _Retryable(f"os-error: {type(e).__name__}") from None
        try:
            payload = json.loads(raw.decode("utf-8"))
            content = payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return raw.decode("utf-8", "replace")  # let the parser decide
        return content if isinstance(content, str) else json.dumps(content)

    def _rate_one(self, messages: list[dict[str, str]]) -> _Outcome:
        """Request + parse with retries; never raises except for config errors."""
        n_req = 0
        transient = 0
        bad_replies = 0
        while True:
            try:
                n_req += 1
                content = self._post(messages)
            except _Retryable as e:
                if transient >= self.max_retries:
                    return _Outcome(False, f"api-error: {e.reason} after {n_req} tries",
                                    False, n_req)
                delay = self._delay(transient, e.retry_after)
                logger.warning("LLM judge: %s from %s, retry %d/%d in %.2fs", e.reason,
                               self.url, transient + 1, self.max_retries, delay)
                transient += 1
                time.sleep(delay)
                continue
            except LLMJudgeConfigError:
                raise
            except LLMJudgeError as e:
                return _Outcome(False, f"api-error: {e}", False, n_req)
            try:
                match, reason = parse_verdict(content)
                return _Outcome(match, self._scrub(reason), True, n_req)
            except ValueError as e:
                if bad_replies >= self.parse_retries:
                    snippet = self._scrub(content.strip().replace("\n", " "))[:160]
                    return _Outcome(False, f"parse-error: {e}; reply: {snippet}", False, n_req)
                bad_replies += 1
                logger.warning("LLM judge: unparseable reply (%s), asking again", e)

    def _rate_cached(self, messages: list[dict[str, str]]) -> _Outcome:
        key = self.cache_key(messages)
        if self._cache is not None:
            hit = self._cache.get(key)
            if hit is not None:
                return _Outcome(hit[0], hit[1], True, 0, cached=True)
        out = self._rate_one(messages)
        if out.ok and self._cache is not None:
            self._cache.put(key, self.model, out.match, out.reason)
        return out

    # -- the Judge protocol ----------------------------------------------------------------
    def judge(self, texts: Sequence[str], targets: Sequence[str]) -> JudgeResult:
        """Rate each (text, target) pair; duplicates share one request."""
        if isinstance(texts, str):
            raise TypeError("judge(texts, targets): texts must be a sequence of strings")
        if len(texts) != len(targets):
            raise ValueError(f"judge: {len(texts)} texts but {len(targets)} targets")
        bad = sorted({t for t in targets if t not in self.emotions})
        if bad:
            raise ValueError(f"judge: targets {bad} are not in {list(self.emotions)}")
        t0 = time.perf_counter()
        msgs = [build_messages(t, e, self.emotions) for t, e in zip(texts, targets, strict=True)]
        keys = [self.cache_key(m) for m in msgs]
        unique: dict[str, list[dict[str, str]]] = {}
        for k, m in zip(keys, msgs, strict=True):
            unique.setdefault(k, m)
        results: dict[str, _Outcome] = {}
        if unique:
            pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(unique)))
            try:
                futs = {k: pool.submit(self._rate_cached, m) for k, m in unique.items()}
                for k, f in futs.items():
                    results[k] = f.result()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
        outs = [results[k] for k in keys]
        k_idx = {e: j for j, e in enumerate(self.emotions)}
        scores = np.full((len(texts), len(self.emotions)), np.nan)
        for i, (o, tgt) in enumerate(zip(outs, targets, strict=True)):
            scores[i, k_idx[tgt]] = 1.0 if o.match else 0.0
        failures = [{"index": i, "reason": o.reason} for i, o in enumerate(outs) if not o.ok]
        counted: set[str] = set()
        n_requests = 0
        for k in keys:
            if k not in counted:
                counted.add(k)
                n_requests += results[k].requests
        return JudgeResult(
            emotions=self.emotions,
            labels=[tgt if o.match else None for o, tgt in zip(outs, targets, strict=True)],
            scores=scores,
            match=[o.match for o in outs],
            meta={
                "judge": self.name, "model": self.model, "url": self.url,
                "n_requests": n_requests,
                "n_cache_hits": sum(o.cached for o in outs),
                "n_failed": len(failures), "failures": failures,
                "reasons": [o.reason for o in outs],
                "seconds": time.perf_counter() - t0,
            },
        )

    def close(self) -> None:
        """Close the cache file."""
        if self._cache is not None:
            self._cache.close()
            self._cache = None
