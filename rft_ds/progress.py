"""tqdm progress bars, shown by rank 0 only: N ranks drawing N bars over one terminal is noise."""

from __future__ import annotations

from typing import Any, Callable, Iterable


def enabled(setting: bool | None, is_main: bool) -> bool:
    """train.progress: None shows bars when the terminal's stderr is a terminal (not in log files); rank 0
    only. The terminal's: under `rft-ds train` the process's own stderr is the rank's log by then."""
    from rft_ds import console

    if not is_main:
        return False
    return console.err().isatty() if setting is None else bool(setting)


def bar(
    iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", show: bool = True, unit: str = "it"
) -> Any:
    from tqdm.auto import tqdm

    from rft_ds import console

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=not show,
        leave=False,
        dynamic_ncols=True,
        file=console.err(),
    )


def vllm_bar(desc: str) -> Callable[..., Any]:
    """For vLLM's use_tqdm: our label. vLLM 0.32 fans a request with n samples out into n sub-requests,
    so its total and its steps already count samples."""
    from tqdm.auto import tqdm

    from rft_ds import console

    def make(*args: Any, **kwargs: Any) -> Any:
        kwargs.update(desc=desc, unit="sample", leave=False, file=console.err())
        return tqdm(*args, **kwargs)

    return make
