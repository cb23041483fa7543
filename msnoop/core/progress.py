"""One progress bar for every long stage (embedding, pretraining, segmentation scoring, bench): tqdm on stderr.

The bar shows a count, a rate and an ETA on a terminal and nothing at all when stderr is not one (a log file, a
pipe, a Ray job's log), so logs hold only the commands' summaries. ``MSNOOP_PROGRESS=1`` forces it on (e.g. under
a terminal multiplexer that hides the TTY), ``MSNOOP_PROGRESS=0`` off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sized
from typing import Any

__all__ = ["PROGRESS_ENV", "progress_bar", "progress_enabled"]

#: Environment variable that forces the bars on (``1``) or off (``0``); unset: on exactly when stderr is a terminal.
PROGRESS_ENV = "MSNOOP_PROGRESS"


def progress_enabled(enabled: bool | None = None) -> bool:
    """Whether bars are drawn: ``enabled`` when given (``False`` wins over everything), else :data:`PROGRESS_ENV`,
    else whether stderr is a terminal."""
    if enabled is False:
        return False
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on") or enabled:
        return True
    return sys.stderr.isatty()


def progress_bar(
    total: int | float | Iterable[Any] | None,
    desc: str,
    *,
    unit: str = "it",
    initial: int = 0,
    enabled: bool | None = None,
) -> Any:
    """A ``tqdm`` bar on stderr (a context manager; ``update(n)``, ``set_postfix_str(text)``, ``close()``).

    Args:
        total: Expected count (``None``: unknown, the bar shows the count and rate only), or an iterable
            (a sized one gives the count): iterating the bar then yields its items and moves the bar.
        desc: What is counted, shown before the bar, e.g. ``"embedding"``.
        unit: Name of one item, e.g. ``"img"``, ``"step"``.
        initial: Count already done (a resumed run).
        enabled: ``False`` never draws; ``None`` follows :func:`progress_enabled`.

    Returns:
        A ``tqdm.tqdm`` instance; a disabled one accepts every call and prints nothing.
    """
    from tqdm import tqdm

    try:
        size: os.terminal_size | None = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):  # not a terminal, or no file descriptor (a notebook's stream)
        size = None
    # A terminal that reports no size (0 x 0: `script`, some CI pseudo-terminals) makes tqdm draw nothing at all:
    # give it a standard one there; elsewhere the bar follows the window's width.
    shape: dict[str, Any] = (
        {"dynamic_ncols": True} if size and size.columns > 0 and size.lines > 0 else {"ncols": 100, "nrows": 24}
    )
    iterable = None if total is None or isinstance(total, int | float) else total
    if iterable is not None:
        total = len(iterable) if isinstance(iterable, Sized) else None
    return tqdm(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not progress_enabled(enabled),
        file=sys.stderr,
        mininterval=0.5,
        leave=False,
        smoothing=0.1,
        **shape,
    )
