"""Keep the user's terminal readable: silence libraries that print banners, warnings or C-level chatter.

- :func:`quietly`: Python-level output and warnings (openmmtools' and pymbar's import banners).
- :func:`quiet_c_output`: the process's stdout/stderr file descriptors too, for C code that writes to them
  directly (mdtraj's DCD reader prints ``dcdplugin) detected standard 32-bit DCD file`` for every file).
- :func:`drop_lightning_notices`: Lightning's info lines that ask nothing of the user (an advertisement, a
  note that a limit bg's config left at its default is at its default).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from typing import Iterator


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """Swallow Python-level stdout, stderr and warnings inside the block."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def quiet_c_output() -> Iterator[None]:
    """Point file descriptors 1 and 2 at /dev/null inside the block (output of C extensions); Python's own
    streams are flushed first so nothing written before the block is lost."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no real descriptors (some embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


#: Lightning info lines that tell a bg user nothing they can act on
LIGHTNING_NOTICES = re.compile(r"💡 Tip: |`Trainer\(limit_\w+_batches=1\.0\)` was configured")


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not LIGHTNING_NOTICES.search(record.getMessage())


def drop_lightning_notices() -> None:
    """Filter :data:`LIGHTNING_NOTICES` out of Lightning's rank-zero log (idempotent)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropNotices) for f in logger.filters):
        logger.addFilter(_DropNotices())
