"""Verifiers on real tasks: answer extraction shared by rewards and maj@k, math-verify's symbolic comparison,
and the worker processes that contain what hangs or crashes, counted in every reward executor."""

import re
import threading
import time

import pytest

from rft_ds.answers import boxed, final_answer, first_line, hashes, last_number, stated, tagged
from rft_ds.config import RewardConfig
from rft_ds.reward_terms import build_terms, score_terms
from rft_ds.rewards import Scores, math_verify
from rft_ds.scoring import term_means
from rft_ds.verifier import VerifierPool

HANGS = "so the answer is \\boxed{9^{9^{9^{9}}}}"  # sympy evaluates the power tower in C: no signal stops it


@pytest.mark.parametrize(
    "finder,text,want",
    [
        (boxed, "first \\boxed{1} then \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        (boxed, "\\boxed{\\{1, 2\\} \\cup {3}}", "\\{1, 2\\} \\cup {3}"),  # nested braces
        (boxed, "\\fbox{42}", "42"),
        (boxed, "\\boxed{unclosed", None),
        (hashes, "work\n#### 1,234\nbye", "1,234"),
        (hashes, "#### 1\n#### 2", "2"),
        (tagged, "<think>7?</think><answer> 8 </answer>", "8"),
        (tagged, "<answer>3</answer> then <answer>4", "4"),  # an unclosed last tag: to the end
        (stated, "Hmm. The answer is 12. Then again the final answer: $\\frac{3}{4}$.", "\\frac{3}{4}"),
        (stated, "So the answer is \\boxed{7} because", "7"),
        (last_number, "from 3 to -5.5 or 1,000 and 3/4", "3/4"),
        (last_number, "no digits here", None),
        (first_line, "\n\n  yes  \nbecause", "yes"),
    ],
)
def test_answer_finders(finder, text, want):
    assert finder(text) == want


def test_final_answer_prefers_what_the_model_marked():
    assert final_answer("tried 3, then 4. \\boxed{5} and 6") == "5"
    assert final_answer("<answer>x=2</answer> 9") == "x=2"
    assert final_answer("13 + 29 = 42") == "42"
    assert final_answer("no answer") is None
    assert final_answer("a\nb", order=("first_line",)) == "a"


@pytest.mark.parametrize(
    "output,reference,right",
    [
        ("so $x = \\boxed{\\frac{1}{2}}$", "0.5", True),
        ("The answer is 0.5.", "1/2", True),
        ("#### 1/2", "\\frac{1}{2}", True),
        ("<answer>2/4</answer>", "0.5", True),
        ("\\boxed{(x-1)(x+1)}", "x^2 - 1", True),  # symbolic, not textual
        ("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", True),  # sets in any order
        ("\\boxed{[0, 1)}", "[0,1)", True),
        ("\\boxed{\\sqrt{2}/2}", "\\frac{1}{\\sqrt{2}}", True),
        ("The answer is 0.49.", "1/2", False),
        ("So the answer is 72 clips.", "72", True),  # words after the marked answer
        ("#### 5 apples", "5", True),
        ("\\boxed{x^2 + 1}", "x^2 - 1", False),
        ("I cannot tell", "3", False),
        ("we get $\\frac{6}{4}$ in the end", "3/2", True),  # no marked answer: math-verify's own last expression
    ],
)
def test_math_verify_compares_mathematically(output, reference, right):
    got = math_verify(None, None, [output], answer=[reference], timeout_s=5.0)
    assert list(got) == [float(right)] and got.counts == {"timeouts": 0, "errors": 0}


def test_a_pool_whose_workers_all_die_serves_the_threads_still_waiting():
    pool = VerifierPool(workers=2, memory_mb=None)
    out = []
    threads = [
        threading.Thread(target=lambda: out.append(pool.check("builtins:pow", [9, 9**9], 0.3))) for _ in range(3)
    ]  # each check is killed at its hard limit: the third waits for a new worker
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == [("timeout", None)] * 3 and not any(t.is_alive() for t in threads)
    pool.close()


def test_boxed_is_linear_on_degenerate_text():
    assert boxed("\\boxed{" * 40000 + "\\boxed{7}") == "7"  # 40k unclosed boxes: one pass, not 40k


def test_verifier_pool_contains_hangs_crashes_and_memory():
    pool = VerifierPool(workers=2, memory_mb=1024)
    t0 = time.monotonic()
    got = pool.run("time:sleep", [[30]], 0.5)  # pure Python: the soft limit (SIGALRM) ends it
    assert got == [("timeout", None)] and time.monotonic() - t0 < 5
    t0 = time.monotonic()
    assert pool.run("builtins:pow", [[9, 9**9]], 0.5) == [("timeout", None)]  # in C: killed at 0.5 + 1 s
    assert time.monotonic() - t0 < 10
    assert pool.run("builtins:bytearray", [[8 * 2**30]], 5.0)[0][0] == "error"  # 8 GB: past its 1 GB limit
    assert pool.run("math:sqrt", [[-1]], 1.0) == [("error", "ValueError: math domain error")]
    assert pool.run("os:_exit", [[3]], 1.0) == [("error", "the verifier worker died (exit 3)")]
    # the killed and dead workers were replaced: the pool still checks, two at a time, from many threads
    out = []
    threads = [
        threading.Thread(target=lambda i=i: out.append(pool.check("operator:add", [i, 1], 5.0))) for i in range(16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v for _, v in out) == list(range(1, 17)) and len(pool._all) <= 2
    pool.close()


@pytest.mark.parametrize("executor", ["inline", "thread", "process"])
def test_math_verify_timeouts_are_cut_scored_and_counted_in_every_executor(executor):
    outs = ["\\boxed{2}", HANGS, "The answer is 3.", "\\boxed{4}", "\\boxed{5}"]
    refs = ["2", "1", "3", "5", "not \\frac{valid"]
    terms = build_terms(
        RewardConfig(
            functions=[
                {
                    "fn": "rft_ds.rewards:math_verify",
                    "executor": executor,
                    "batch_size": 2,
                    "kwargs": {"timeout_s": 1.0},
                }
            ]
        )
    )
    t0 = time.monotonic()
    combined, parts = score_terms(
        terms, outs, [""] * 5, outs, [[1]] * 5, list(range(5)), {"answer": refs}, None, max_concurrency=2
    )
    assert time.monotonic() - t0 < 60  # no stuck call, no stuck rank
    assert combined.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    # the power tower: cut off, scored 0, counted; the reference that does not parse: an error, counted
    assert term_means(terms, parts) == {"reward_math_verify_timeouts": 1, "reward_math_verify_errors": 1}
    assert term_means(terms, parts) == {"reward_math_verify_timeouts": 0, "reward_math_verify_errors": 0}  # taken


def test_scores_are_a_list_that_keeps_its_counts_across_pickling():
    import pickle

    s = pickle.loads(pickle.dumps(Scores([1.0, 0.0], timeouts=2)))
    assert s == [1.0, 0.0] and s.counts == {"timeouts": 2} and isinstance(s, list)


def test_reasoning_gym_spec_parsing():
    from rft_ds.tasks import parse_reasoning_gym

    assert parse_reasoning_gym("reasoning_gym:chain_sum?size=20&seed=3&p=0.5&flag=true") == (
        "chain_sum",
        {"size": 20, "seed": 3, "p": 0.5, "flag": True},
    )
    assert parse_reasoning_gym("reasoning_gym:gcd") == ("gcd", {})
    with pytest.raises(ValueError, match="expected key=value"):
        parse_reasoning_gym("reasoning_gym:gcd?size")


@pytest.mark.parametrize(
    "spec",
    [
        "reasoning_gym:basic_arithmetic?size=6&seed=1",
        "reasoning_gym:letter_counting?size=6&seed=1",
        "reasoning_gym:polynomial_equations?size=4&seed=1",
        "reasoning_gym:gsm_symbolic?size=30&seed=5",
    ],
)  # entry 28 is not JSON
def test_reasoning_gym_tasks_scored_by_their_own_scorer(spec):
    from rft_ds.rewards import reasoning_gym
    from rft_ds.tasks import reasoning_gym as load

    rows = load(spec)
    other = load(re.sub(r"seed=(\d+)", lambda m: f"seed={int(m.group(1)) + 1}", spec))
    assert [r["prompt"] for r in rows] != [r["prompt"] for r in other]  # another seed: other problems (eval)
    meta = {k: [r[k] for r in rows] * 3 for k in ("rg_task", "rg_config", "rg_entry")}
    outs = (
        [f"Let me think.\n<answer>{r['answer']}</answer>" for r in rows]  # the task's own answer format
        + [f"I conclude \\boxed{{{r['answer']}}}" for r in rows]  # another marked answer
        + ["<answer>certainly wrong</answer>"] * len(rows)
    )
    got = reasoning_gym(None, [r["prompt"] for r in rows] * 3, outs, **meta)
    n = len(rows)
    assert list(got)[: 2 * n] == [1.0] * (2 * n) and max(list(got)[2 * n :]) < 1.0
    assert got.counts == {"timeouts": 0, "errors": 0}
