"""A client of a running `usf-bios serve`: the REST calls the CLI's client commands (`usf-bios jobs …`,
`usf-bios submit`) make, at ``USF_SERVER_URL`` with ``USF_API_KEY``. Every failure is a ``ServerError`` whose
message says what the server answered (its ``detail`` and the fields at fault) or why it could not be reached.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import httpx

from usf_bios.settings import Settings


class ServerError(RuntimeError):
    """The server refused a request (``status_code``: its HTTP status) or could not be reached (None)."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text.strip()[:300] or response.reason_phrase}"
    detail = body.get("detail") if isinstance(body, dict) else None
    errors = body.get("errors") if isinstance(body, dict) else None
    if errors and isinstance(errors, list):
        return "; ".join(f"{e.get('field')}: {e.get('message')}" for e in errors if isinstance(e, dict))
    return f"HTTP {response.status_code}: {detail if detail is not None else body}"


class Client:
    """The server's /api, with the key when one is set."""

    def __init__(self, url: str, key: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url + "/api", headers=headers, timeout=timeout)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Client":
        key = settings.api_key.get_secret_value() if settings.api_key else None
        return cls(settings.server_url, key)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------------
    def _unreachable(self, err: httpx.HTTPError) -> ServerError:
        return ServerError(f"cannot reach the server at {self.url} ({type(err).__name__}: {err}); start it with "
                           "`usf-bios serve`, or point USF_SERVER_URL at it")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise self._unreachable(err) from None
        if response.status_code >= 400:
            raise ServerError(_message(response), response.status_code)
        return response

    # -- jobs --------------------------------------------------------------------------------------
    def list_jobs(self, status: str | None = None, limit: int = 50) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
        return self.request("GET", "/jobs", params=params).json()

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/jobs/{job_id}").json()

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/jobs", json=spec).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/cancel").json()

    def resume(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/jobs/{job_id}/resume").json()

    def delete(self, job_id: str) -> None:
        try:
            self.request("DELETE", f"/jobs/{job_id}")
        except ServerError as err:
            if err.status_code == 405:
                raise ServerError(f"the server at {self.url} cannot delete jobs (it has no DELETE /api/jobs/{{id}}); "
                                  "update it", 405) from None
            raise

    def logs(self, job_id: str, tail: int = 200) -> str:
        return self.request("GET", f"/jobs/{job_id}/logs", params={"tail": tail}).text

    def download(self, job_id: str, dest: Path, progress: Callable[[int], None] | None = None) -> int:
        """Stream the job's output folder (a tar) into ``dest``; bytes written. A partial file is removed."""
        written = 0
        try:
            with self._http.stream("GET", f"/jobs/{job_id}/download", timeout=httpx.Timeout(60, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ServerError(_message(response), response.status_code)
                with dest.open("wb") as handle:
                    for chunk in response.iter_bytes(1 << 20):
                        handle.write(chunk)
                        written += len(chunk)
                        if progress is not None:
                            progress(written)
        except httpx.HTTPError as err:
            dest.unlink(missing_ok=True)
            raise self._unreachable(err) from None
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return written

    def events(self, job_id: str, since: int = -1) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's live feed (SSE): (kind, data) for every event so far, then each new one; kind is the engine
        event's type (stage, metric, eval, checkpoint, done) or 'status'. Ends when the server ends the stream
        (once the job is final)."""
        try:
            with self._http.stream("GET", f"/jobs/{job_id}/events", params={"since": since},
                                   timeout=httpx.Timeout(60, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ServerError(_message(response), response.status_code)
                kind, data = "message", ""
                for line in response.iter_lines():
                    if not line:
                        if data:
                            yield kind, json.loads(data)
                        kind, data = "message", ""
                    elif line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        data += line[5:].strip()
        except httpx.HTTPError as err:
            raise self._unreachable(err) from None
