"""The server's and the worker's own log lines (scheduler, remote executor, inference engine, worker) on stderr
beside uvicorn's, at INFO; installed once by each app's start, so `usf-bios serve`, `usf-bios worker` and
`uvicorn --factory` log alike."""

from __future__ import annotations

import logging


def log_to_stderr() -> None:
    logger = logging.getLogger("usf_bios")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
