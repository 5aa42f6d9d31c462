"""No API key in the server's log: uvicorn logs each request's path with its query string (``uvicorn.access``)
and each WebSocket handshake's (``uvicorn.error``), and browsers send their key as ``?token=usf_…`` on the
WebSocket URL. A filter on both loggers rewrites the value of ``token=`` and of any query parameter whose value
starts with ``usf_``, and the ``sig=`` of a signed dataset URL (and any other ``usf_…`` key in a message) to ``[redacted]`` before a handler sees it."""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
UVICORN_LOGGERS = ("uvicorn.access", "uvicorn.error")
_QUERY_VALUE = re.compile(r"(?P<name>[?&](?:token|sig|[^=&\s\"']+(?==usf_))=)[^&\s\"'#]*", re.IGNORECASE)
_KEY = re.compile(r"usf_[A-Za-z0-9_-]{16,}")


def redact_keys(text: str) -> str:
    """``/api/jobs/x/ws?since=3&token=usf_abc…`` → ``/api/jobs/x/ws?since=3&token=[redacted]``."""
    return _KEY.sub(REDACTED, _QUERY_VALUE.sub(lambda m: m["name"] + REDACTED, text))


class KeyRedactingFilter(logging.Filter):
    """Redacts keys in a record's message and in its string arguments (uvicorn passes the path as one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_keys(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_keys(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_keys(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def install_key_redaction() -> None:
    """Add the filter to uvicorn's loggers (once each); called at every start of the app (its lifespan), after
    uvicorn configured its logging, so it holds for ``usf-bios serve`` and ``uvicorn --factory`` alike."""
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, KeyRedactingFilter) for f in logger.filters):
            logger.addFilter(KeyRedactingFilter())
