"""Domain errors of the control plane. They know nothing of HTTP: ``api/main.py`` maps each kind to a status
code and the API's JSON error shapes (``NotFound`` 404, ``Conflict`` 409, ``Forbidden`` 403, ``Unsupported``
415, ``Busy`` 503, ``Invalid`` 422 with ``errors[]``); the CLI and a worker can print them as they are."""

from __future__ import annotations


class DomainError(Exception):
    """A request the control plane refuses; ``str(err)`` is the message for the user."""


class NotFound(DomainError):
    """Nothing by that reference among what the caller may see (another key's object reads the same)."""

    def __init__(self, what: str, ref: str):
        super().__init__(f"no {what} {ref!r}")


class Conflict(DomainError):
    """The request clashes with the current state: a name taken, a job in a status that forbids it."""


class Forbidden(DomainError):
    """The caller may not do this (an admin's action, a folder outside the allowed roots)."""


class Busy(DomainError):
    """Not yet: what the request needs is moments away (a job still saving its checkpoint as it stops); the same
    request again shortly succeeds (503 with Retry-After)."""


class Unsupported(DomainError):
    """A file of a kind the server does not take."""


class Invalid(DomainError):
    """A field of the request is at fault: ``field`` is its path (``hyperparameters.lora_r``, ``base_model``)."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")

    @property
    def message(self) -> str:
        return self.reason

    def errors(self) -> list[dict[str, str]]:
        """The API's error list, as the request validation handler sends it."""
        return [{"field": self.field, "message": self.reason}]
