"""Scoring throughput of slow reward terms (a verifier or a reward server answering in ~50 ms per call),
at several concurrency limits, side by side in one run.

    python benchmarks/bench_rewards.py [--samples 256] [--latency 0.05]

Three kinds of term, each called once per sample (batch_size 1, as a per-sample verifier is):
  async    `async def` that awaits asyncio.sleep(latency): awaited, at most reward.max_concurrency in flight
  thread   a plain function that time.sleep()s: executor thread, that many daemon threads
  http     reward.url against a local HTTP server (standard library, threaded) that sleeps before replying
For each, samples/s at max_concurrency 1, 8 and 64, and the speed-up over 1. The ideal is
concurrency / latency samples/s; what is lost to it is the scorer's own overhead on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import threading
import time

import common  # noqa: F401  (rft_ds from this checkout)

from rft_ds.config import RewardConfig
from rft_ds.reward_terms import build_terms, score_terms

LATENCY = 0.05


async def async_judge(prompts: list[str], completions: list[str], **kw) -> list[float]:
    await asyncio.sleep(LATENCY)
    return [float(len(c)) for c in completions]


def sleepy_judge(prompts: list[str], completions: list[str], **kw) -> list[float]:
    time.sleep(LATENCY)
    return [float(len(c)) for c in completions]


def serve() -> str:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(LATENCY)
            reply = json.dumps({"rewards": [float(len(c)) for c in body["completions"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 256  # listen backlog; the default 5 drops connections when 64 arrive at once

    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}/score"


def rate(kind: str, url: str, n: int, concurrency: int) -> float:
    if kind == "http":
        rc = RewardConfig(url=url, max_concurrency=concurrency, batch_size=1)
    else:
        fn = async_judge if kind == "async" else sleepy_judge
        rc = RewardConfig(
            functions=[{"fn": fn, "executor": "inline" if kind == "async" else "thread"}],
            max_concurrency=concurrency,
            batch_size=1,
        )
    terms = build_terms(rc)
    outs = [f"answer {i}" for i in range(n)]
    t0 = time.perf_counter()
    scores, _ = score_terms(
        terms,
        outs,
        [""] * n,
        outs,
        [[0]] * n,
        list(range(n)),
        {},
        None,
        rc.batch_size,
        rc.max_concurrency,
        rc.timeout_s,
    )
    secs = time.perf_counter() - t0
    assert scores.tolist() == [float(len(o)) for o in outs]
    return n / secs


def main() -> None:
    global LATENCY
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--latency", type=float, default=LATENCY)
    args = ap.parse_args()
    LATENCY = args.latency
    url = serve()
    print(f"{args.samples} samples, one call each, {LATENCY * 1000:.0f} ms per call")
    print(f"{'term':8s} {'concurrency':>11s} {'samples/s':>10s} {'ideal':>8s} {'vs 1':>6s}")
    for kind in ("async", "thread", "http"):
        base = None
        for c in (1, 8, 64):
            r = rate(kind, url, args.samples, c)
            base = base or r
            print(f"{kind:8s} {c:11d} {r:10.1f} {c / LATENCY:8.0f} {r / base:5.1f}x", flush=True)


if __name__ == "__main__":
    main()
