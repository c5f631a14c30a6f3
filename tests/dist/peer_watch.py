"""2 ranks over gloo: rank 1 posts a failure and stays alive without joining the next collective (what a
failed peer looks like to NCCL, which does not end a wait when a peer dies); rank 0 waits in a barrier
inside failing_together and must leave on its own, seconds later, with rank 1's error in its output."""

import sys
import time

from rft_ds import distributed as D


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
    main(float(sys.argv[1]))
