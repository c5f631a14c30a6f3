"""2 ranks over gloo.

posted GRACE: rank 1 posts a failure and stays alive without joining the next collective (what a failed peer
looks like to NCCL, which does not end a wait when a peer dies); rank 0 waits in a barrier inside
failing_together and must leave on its own, seconds later, with rank 1's error in its output.

own: rank 1 posts its failure and then waits inside failing_together where nobody will join it (its error
left it in a gather the others never reach): its own watcher ends it, saying its error on the terminal.

release: the process-group timeout is 3 s; rank 0 works 6 s (a metric_fn) while rank 1 waits for it on the
store (wait_released), then both meet in a barrier: it must pass, where a wait inside a collective would not."""

import sys
import time

from rft_ds import distributed as D


def release() -> None:
    D.init("gloo", 3)
    key = D.release_key()
    if D.is_main():
        time.sleep(6)
        D.release(key)
    else:
        D.wait_released(key)
    D.barrier()
    print(f"rank {D.rank()} passed the barrier", flush=True)


def own() -> None:
    D.init("gloo", 120)
    if D.rank() == 1:
        with D.failing_together(grace_s=2, poll_s=0.5):
            D.post_failure("RuntimeError: CUDA out of memory (injected)")
            time.sleep(60)  # stuck, as in a gather the others never reach
    time.sleep(5)  # rank 0: elsewhere, not in a collective (it leaves on its own)


def main(grace_s: float) -> None:
    D.init("gloo", 120)
    if D.rank() == 1:
        assert D.post_failure("RuntimeError: CUDA out of memory (injected)") is True
        time.sleep(120)
        return
    t0 = time.monotonic()
    with D.failing_together(grace_s=grace_s, poll_s=0.5):
        D.barrier()  # never joined: without the watcher this waits the process-group timeout (120 s)
    print(f"the barrier returned after {time.monotonic() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    {"release": release, "own": own}.get(sys.argv[1], lambda: main(float(sys.argv[2])))()
