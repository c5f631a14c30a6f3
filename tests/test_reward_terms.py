"""Reward terms: signatures told apart once, weights and None, async / thread / process calls with bounded
concurrency and timeouts, a remote scorer against a live HTTP server, a reward model plus a rule."""

import asyncio
import functools
import http.server
import json
import os
import socket
import threading
import time

import numpy as np
import pytest

from rft_ds.config import ConfigError, RewardConfig
from rft_ds.reward_terms import HttpScorer, build_terms, call_style, check_arguments, load_reward_models, score_terms
from rft_ds.scoring import RewardError

PROMPTS = ["p0 ", "p1 ", "p2 ", "p3 "]
OUTS = ["aa", "", "bbbb", "c"]


def score(terms, outs=OUTS, **kw):
    n = len(outs)
    prompts = (PROMPTS * n)[:n]
    return score_terms(
        terms,
        [p + o for p, o in zip(prompts, outs)],
        prompts,
        list(outs),
        [[1] * len(o) for o in outs],
        list(range(n)),
        {"answer": [o.upper() for o in outs]},
        None,
        **kw,
    )


def trlx_len(samples, prompts, outputs, **kwargs):
    return [float(len(o)) for o in outputs]


def trl_upper(prompts, completions, answer, **kwargs):
    return [float(c.upper() == a) for c, a in zip(completions, answer)]


def test_signatures_told_apart_once():
    assert call_style(trlx_len, "f") == ("trlx", None)
    assert call_style(trl_upper, "f") == ("trl", None)
    assert call_style(lambda **kw: [], "f") == ("trlx", None)  # trlx's keywords, as rft_ds always called
    assert call_style(lambda prompts, completions: [], "f") == ("trl", frozenset({"prompts", "completions"}))
    assert call_style(functools.partial(trlx_len, prompts=[]), "f")[0] == "trlx"

    class Judge:
        def __call__(self, prompts, completions, **kw):
            return []

    assert call_style(Judge(), "f")[0] == "trl"
    with pytest.raises(
        ConfigError, match=r"reward term f: cannot tell how to call it from its parameters \['a', 'b'\]"
    ):
        call_style(lambda a, b: [], "f")


def test_weights_and_none_semantics():
    terms = build_terms(
        RewardConfig(
            functions=["tests.rewards:length_penalty", {"fn": "tests.test_reward_terms:trl_upper", "name": "match"}],
            weights=[2.0, 1, 0.5],
        ),
        trlx_len,
    )
    assert [t.name for t in terms] == ["trlx_len", "length_penalty", "match"]
    assert [t.style for t in terms] == ["trlx", "trl", "trl"]
    combined, parts = score(terms)
    want_len = np.array([2, 0, 4, 1.0])
    want_pen = np.array([-0.02, np.nan, -0.04, -0.01])  # None for the empty completion: not applied
    np.testing.assert_allclose(parts[1], want_pen)
    np.testing.assert_allclose(combined, 2 * want_len + np.nan_to_num(want_pen) + 0.5 * 1.0)
    # a sample no term scores is an error naming it
    with pytest.raises(
        RewardError, match=r"no reward term scored sample 1 \(prompt 1, output ''\): length_penalty all"
    ):
        score(build_terms(RewardConfig(functions=["tests.rewards:length_penalty"])))
    # None is not a score for a term that must apply: the message names the term and the sample
    with pytest.raises(RewardError, match=r"<lambda> returned str 'x' for sample 2"):
        score(build_terms(RewardConfig(), lambda samples, outputs, **kw: [1, 2, "x", 3]))


def test_config_errors_before_any_model():
    def bad(**r):
        with pytest.raises(ValueError) as e:  # ConfigError, or DataError for an import
            build_terms(RewardConfig(**r), trlx_len)
        return str(e.value)

    assert "reward.weights has 1 entries for 2 reward terms (trlx_len, remote)" in bad(
        url="http://x:1/s", weights=[1.0]
    )
    assert "reward.functions[0]: unknown key 'wieght'" in bad(
        functions=[{"fn": "tests.rewards:length_penalty", "wieght": 1}]
    )
    assert "must name exactly one of fn, reward_model, url; got ['fn', 'url']" in bad(
        functions=[{"fn": "tests.rewards:length_penalty", "url": "http://x/"}]
    )
    assert "reward.functions[0].executor must be one of inline, thread, process" in bad(
        functions=[{"fn": "tests.rewards:length_penalty", "executor": "gpu"}]
    )
    assert "reward.url must be an http:// or https:// URL" in bad(url="localhost:80")
    assert "reward.functions[0]: cannot import module 'nowhere'" in bad(functions=["nowhere:f"])

    async def judge(prompts, completions, **kw):
        return []

    with pytest.raises(
        ConfigError, match="an async function is awaited on this rank's event loop; executor must be inline"
    ):
        build_terms(RewardConfig(functions=[{"fn": judge, "executor": "thread"}]))
    with pytest.raises(ConfigError, match="executor process needs a function importable by name"):
        build_terms(RewardConfig(functions=[{"fn": lambda samples, **k: [], "executor": "process"}]))
    terms = build_terms(RewardConfig(), lambda prompts, completions, solution: [])
    with pytest.raises(ConfigError, match="reward term <lambda> requires 'solution', which is neither a trl argument"):
        check_arguments(terms, {"answer"})
    check_arguments(terms, {"solution"})


def test_async_concurrency_is_bounded():
    state = {"now": 0, "peak": 0, "calls": 0}

    async def judge(prompts, completions, **kw):
        state["now"] += 1
        state["calls"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.02)
        state["now"] -= 1
        return [len(c) for c in completions]

    terms = build_terms(RewardConfig(functions=[{"fn": judge, "batch_size": 1}]))
    assert terms[0].is_async
    outs = [chr(97 + i % 26) * (i % 5) for i in range(40)]
    combined, _ = score(terms, outs, max_concurrency=6)
    assert combined.tolist() == [float(len(o)) for o in outs]
    assert state == {"now": 0, "peak": 6, "calls": 40}


@pytest.mark.parametrize("executor", ["async", "inline", "thread"])
def test_timeout_names_the_term_and_the_sample(executor):
    async def stuck_async(prompts, completions, **kw):
        await asyncio.sleep(0 if "bbbb" not in completions else 30)
        return [1.0] * len(completions)

    def stuck(prompts, completions, **kw):
        time.sleep(0 if "bbbb" not in completions else 30)
        return [1.0] * len(completions)

    entry = {"fn": stuck_async if executor == "async" else stuck, "name": "verifier", "batch_size": 2}
    if executor == "thread":
        entry["executor"] = "thread"
    t0 = time.monotonic()
    with pytest.raises(
        RewardError,
        match=r"reward term verifier timed out after 0.3 s \(reward.timeout_s\) on a call "
        r"of 2 samples from sample 2 \(prompt 2, output 'bbbb'\)",
    ):
        score(build_terms(RewardConfig(functions=[entry])), timeout_s=0.3)
    assert time.monotonic() - t0 < 10  # gave up on the stuck call, did not wait it out


def test_process_executor_runs_calls_in_other_processes():
    terms = build_terms(
        RewardConfig(
            functions=[{"fn": "tests.rewards:pid_of_call", "executor": "process", "batch_size": 2}], max_concurrency=2
        )
    )
    combined, _ = score(terms)
    pids = set(combined.tolist())
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


class Server:
    """A real HTTP reward server on localhost; each path misbehaves its own way."""

    def __init__(self):
        hits = self.hits = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hits[self.path] = hits.get(self.path, 0) + 1
                n = len(body["completions"])
                status, reply = (
                    200,
                    json.dumps(
                        {
                            "rewards": [
                                len(c) + len(body["metadata"]["answer"][i]) for i, c in enumerate(body["completions"])
                            ]
                        }
                    ),
                )
                if self.path == "/slow" or (self.path == "/slow-once" and hits[self.path] == 1):
                    time.sleep(2)
                elif self.path == "/flaky" and hits[self.path] == 1:
                    status, reply = 500, "overloaded"
                elif self.path == "/down":
                    status, reply = 503, "down"
                elif self.path == "/reject":
                    status, reply = 422, "bad request"
                elif self.path == "/garbage":
                    reply = "<html>oops"
                elif self.path == "/short":
                    reply = json.dumps([1.0] * (n - 1))
                elif self.path == "/nolist":
                    reply = json.dumps({"ok": True})
                self.send_response(status)
                self.end_headers()
                self.wfile.write(reply.encode())

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def remote(url, **kw):
    terms = build_terms(
        RewardConfig(
            url=url,
            timeout_s=kw.pop("timeout_s", 5),
            http_retries=kw.pop("retries", 2),
            batch_size=kw.pop("batch_size", None),
        )
    )
    terms[0].fn.backoff_s = 0.05
    return score(terms)[0]


def test_remote_scorer_against_a_live_server(server):
    assert remote(server.base + "/ok", batch_size=3).tolist() == [4, 0, 8, 2]  # 2 requests, in order
    assert remote(server.base + "/flaky").tolist() == [4, 0, 8, 2]  # a 500, then success
    assert server.hits["/flaky"] == 2
    with pytest.raises(RewardError, match=r"reward.url http://127.0.0.1:\d+/reject: HTTP 422 .*\(not retried\)"):
        remote(server.base + "/reject")
    assert server.hits["/reject"] == 1
    with pytest.raises(RewardError, match=r"/down: HTTP 503 Service Unavailable after 3 tries"):
        remote(server.base + "/down")
    with pytest.raises(RewardError, match=r"/garbage: the reply is not JSON: b'<html>oops'"):
        remote(server.base + "/garbage")
    with pytest.raises(RewardError, match=r"remote returned 3 scores for 4 samples"):
        remote(server.base + "/short")
    with pytest.raises(RewardError, match=r"/nolist: the reply holds no list of scores"):
        remote(server.base + "/nolist")
    # issue 31, 15: a read timeout is retried like a connection error (the first reply here is late, the second not)
    assert remote(server.base + "/slow-once", timeout_s=0.5).tolist() == [4, 0, 8, 2]
    assert server.hits["/slow-once"] == 2
    with pytest.raises(RewardError, match=r"/slow: no reply within 0.5 s \(reward.timeout_s\) after 3 tries"):
        remote(server.base + "/slow", timeout_s=0.5)
    assert server.hits["/slow"] == 3


def test_remote_scorer_dead_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    with pytest.raises(
        RewardError, match=rf"reward.url http://127.0.0.1:{port}/s: ConnectionRefusedError: .* after 2 tries"
    ):
        remote(f"http://127.0.0.1:{port}/s", retries=1)


def test_reward_model_with_a_format_rule(classifier):
    terms = build_terms(
        RewardConfig(reward_model=str(classifier), functions=["tests.rewards:length_penalty"], weights=[0.5, 1.0])
    )
    assert [t.name for t in terms] == ["length_penalty", "reward_model"] and terms[1].fn is None
    load_reward_models(terms)
    combined, parts = score(terms)
    rm = np.array(terms[1].fn([p + o for p, o in zip(PROMPTS, OUTS)], PROMPTS, OUTS))
    np.testing.assert_allclose(parts[1], rm, atol=1e-6)
    np.testing.assert_allclose(combined, 0.5 * np.nan_to_num(parts[0]) + rm, atol=1e-6)


def test_http_scorer_is_a_trl_term():
    assert call_style(HttpScorer("http://x/"), "remote") == ("trl", None)


def test_reward_models_report_what_they_cut(classifier):
    """Each reward model's cut inputs reach the metrics as reward_<name>_truncated, once per scoring."""
    from rft_ds.scoring import term_means

    terms = build_terms(
        RewardConfig(
            reward_model=str(classifier),
            functions=[{"reward_model": str(classifier), "max_length": 48, "name": "short_rm"}],
        )
    )
    assert terms[0].reward_model["max_length_field"] == "reward.functions[0].max_length"
    assert terms[1].reward_model["max_length_field"] == "reward.reward_model_max_length"
    load_reward_models(terms)
    outs = ["aa", " going up 1 2 3." * 60, " going up." * 10, "c"]  # with the prompt: 4, 843, 83 and 3 tokens
    with pytest.warns(UserWarning, match="cut the middle"):
        _, parts = score(terms, outs)
    got = term_means(terms, parts)
    assert got["reward_short_rm_truncated"] == 2 and got["reward_reward_model_truncated"] == 1
    assert set(got) == {
        "reward_short_rm_mean",
        "reward_reward_model_mean",
        "reward_short_rm_truncated",
        "reward_reward_model_truncated",
    }
    assert term_means(terms, parts)["reward_short_rm_truncated"] == 0  # counted once
    assert term_means(terms[1:], parts[1:]) == {"reward_reward_model_truncated": 0}  # a single reward model too
    assert term_means(build_terms(RewardConfig(reward_fn="tests.rewards:length_penalty")), parts[:1]) == {}
    with pytest.raises(ConfigError, match=r"reward.functions\[0\].max_length=48 cannot hold prompt 5"):
        terms[0].fn(None, ["p0 " * 30], ["x"], prompt_ids=[5])
