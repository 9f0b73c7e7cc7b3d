"""The first moments of a script: Ctrl-C while its first modules import is one line and exit 130, as later.

    from simclr.starting import starting
    with starting():
        from simclr.cli import run_cli

Only the standard library is imported here, so the guard is in place before anything slow loads.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def starting() -> Iterator[None]:
    """Turn a KeyboardInterrupt inside the block into the one-line message and exit code 130."""
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted while starting; nothing was written", file=sys.stderr)
        sys.exit(130)
