"""What every /v1 route shares: OpenAI's error shape, the caller of an OpenAI client's key, the inference engine.

Errors under /v1 are ``{"error": {"message", "type", "param", "code"}}`` (the official client reads them): a
domain error, a dataset fault (400 naming the file's line), a body that does not validate (400 naming the field),
a refused key (401), a full queue (429 with Retry-After), an engine that cannot serve (503).
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Coroutine

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from usf_bios.api.bodies import bearer
from usf_bios.api.deps import caller_of
from usf_bios.control.errors import Conflict, DomainError, Forbidden, Invalid, NotFound, Unsupported
from usf_bios.control.keys import LOCAL_USER, Caller
from usf_bios.datasets.formats import DatasetError
from usf_bios.inference.engine import EngineUnavailable, InferenceEngine, QueueFull
from usf_bios.inference.sampling import RequestError
from usf_bios.spec import field_errors


def openai_error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def error_for(exc: Exception) -> JSONResponse | None:
    """OpenAI's answer for an exception a /v1 route raised; None for one that is not the caller's fault."""
    if isinstance(exc, DatasetError):
        return openai_error(400, str(exc), param="file", code="invalid_file")
    if isinstance(exc, NotFound):
        code = "model_not_found" if str(exc).startswith("no model") else "not_found"
        return openai_error(404, str(exc), param="model" if code == "model_not_found" else None, code=code)
    if isinstance(exc, Invalid):
        return openai_error(400, str(exc), param=exc.field, code="invalid_value")
    if isinstance(exc, RequestError):
        return openai_error(400, str(exc), param=exc.field, code="invalid_value")
    if isinstance(exc, Conflict):
        return openai_error(409, str(exc), code="conflict")
    if isinstance(exc, Forbidden):
        return openai_error(403, str(exc), kind="permission_error", code="forbidden")
    if isinstance(exc, Unsupported):
        return openai_error(400, str(exc), param="file", code="unsupported_file")
    if isinstance(exc, DomainError):
        return openai_error(400, str(exc))
    if isinstance(exc, QueueFull):
        return openai_error(429, str(exc), kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, EngineUnavailable):
        return openai_error(503, str(exc), kind="server_error", code="engine_unavailable", headers={"Retry-After": "5"})
    if isinstance(exc, RequestValidationError):
        errors = field_errors(list(exc.errors()), where="body", skip=("body",))
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return openai_error(400, detail, param=errors[0]["field"] if errors else None, code="invalid_value")
    if isinstance(exc, HTTPException):
        kind = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}.get(
            exc.status_code, "invalid_request_error")
        code = "invalid_api_key" if exc.status_code == 401 else None
        return openai_error(exc.status_code, str(exc.detail), kind=kind, code=code, headers=exc.headers)
    return None


class OpenAIRoute(APIRoute):
    """A route whose errors take OpenAI's shape (the app's own handlers answer ``{"detail"}`` elsewhere)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - mapped below, or raised as it was
                answer = error_for(exc)
                if answer is None:
                    raise
                return answer

        return handle


async def get_openai_caller(request: Request) -> Caller:
    """The key's caller, as under /api. An OpenAI client always sends a key, so on a server without keys (loopback)
    one that is not a USF BIOS key (``usf_…``) counts as none; a ``usf_`` key is checked even there."""
    known = getattr(request.state, "caller", None)
    if known is not None:
        return known
    key = bearer(request.headers.get("authorization"))
    if key is not None and not key.startswith("usf_") and not request.app.state.auth_required:
        return LOCAL_USER
    return await caller_of(request.app, key)


def get_engine(request: Request) -> InferenceEngine:
    return request.app.state.inference


OpenAICaller = Annotated[Caller, Depends(get_openai_caller)]
EngineDep = Annotated[InferenceEngine, Depends(get_engine)]
