"""Model downloads from the Hugging Face Hub or ModelScope that the server runs (``POST /api/models/pull``, the
models page's Download): each is its own process (``python -m usf_bios.models.hub``, so the server itself stays
offline), followed by a thread that registers the model once it is complete. Progress is the bytes of the
repository in the source's cache, partial files included. Pulls live in memory: a restarted server forgets those under way, and a new pull of the
same model continues its partial files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from usf_bios.control.db import Database
from usf_bios.control.errors import Conflict, Invalid, NotFound
from usf_bios.control.executors.local import engine_environment
from usf_bios.control.keys import Caller, name_taken
from usf_bios.control.models import NotAllowed, allowed_roots, confine_to_roots, describe_folder
from usf_bios.control.schemas import ModelPublic, PullCreate, PullPublic
from usf_bios.control.tables import ModelEntry, new_id
from usf_bios.models.hub import LABELS, cache_bytes, cache_dir, default_revision, refusal
from usf_bios.models.validate import ModelFolderError
from usf_bios.settings import Settings
from usf_bios.storage import StorageLayout


@dataclass
class Pull:
    id: str
    repo_id: str
    revision: str
    name: str
    owner: str | None
    source: str = "huggingface"
    state: str = "running"     # running | completed | failed (PullPublic.status)
    files: int | None = None
    total_bytes: int | None = None
    error: str | None = None
    model: ModelPublic | None = None


class Pulls:
    """The server's pulls (``app.state.pulls``)."""

    def __init__(self, db: Database, layout: StorageLayout, settings: Settings):
        self.db, self.layout, self.settings = db, layout, settings
        self._pulls: dict[str, Pull] = {}
        self._lock = threading.Lock()

    def start(self, caller: Caller, body: PullCreate) -> Pull:
        """Start a pull (or return the one of this repo and revision under way)."""
        off = refusal(body.source, self.settings.supported_model_sources)
        if off:
            raise Invalid("source", f"downloads from {LABELS[body.source]} are off on this server: {off}")
        name = body.name or body.repo_id
        revision = body.revision or default_revision(body.source)
        key = (body.source, body.repo_id, revision, caller.owner)
        with self._lock:
            for pull in self._pulls.values():
                if (pull.source, pull.repo_id, pull.revision, pull.owner) == key and pull.state == "running":
                    return pull
            with self.db.session() as session:
                if name_taken(session, ModelEntry, caller.owner, name):
                    raise Conflict(f"you already have a model named {name!r}")
            pull = Pull(new_id(), body.repo_id, revision, name, caller.owner, body.source)
            self._pulls[pull.id] = pull
        env = {**engine_environment(self.settings, []), "HF_HUB_OFFLINE": "0"}
        env.pop("CUDA_VISIBLE_DEVICES", None)
        proc = subprocess.Popen([sys.executable, "-m", "usf_bios.models.hub", "--source", body.source, body.repo_id,
                                 revision],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env,
                                cwd=self.layout.root, text=True, start_new_session=True)
        threading.Thread(target=self._follow, args=(pull, proc), name=f"usf-pull-{pull.id}", daemon=True).start()
        return pull

    def _follow(self, pull: Pull, proc: subprocess.Popen) -> None:
        path: str | None = None
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "total_bytes" in message:
                pull.files, pull.total_bytes = len(message["files"]), message["total_bytes"]
            elif "error" in message:
                pull.error = message["error"]
            elif "path" in message:
                path = message["path"]
        code = proc.wait()
        if path is None:
            pull.error = pull.error or f"the download process ended with exit status {code}"
            pull.state = "failed"
            return
        try:
            pull.model = self._register(pull, Path(path))
            pull.state = "completed"
        except (Conflict, NotAllowed, ModelFolderError, OSError) as err:
            pull.error = "; ".join(err.problems) if isinstance(err, ModelFolderError) else str(err)
            pull.state = "failed"

    def _register(self, pull: Pull, folder: Path) -> ModelPublic:
        resolved = confine_to_roots(folder, allowed_roots(self.layout, self.settings))
        facts = describe_folder(resolved)
        with self.db.session() as session:
            if name_taken(session, ModelEntry, pull.owner, pull.name):
                raise Conflict(f"a model named {pull.name!r} was registered while it downloaded")
            row = ModelEntry(name=pull.name, source=pull.source, repo_id=pull.repo_id, owner_key_id=pull.owner,
                             **facts)
            session.add(row)
            session.commit()
            session.refresh(row)
            return ModelPublic.model_validate(row)

    def get(self, caller: Caller, pull_id: str) -> Pull:
        pull = self._pulls.get(pull_id)
        if pull is None or not caller.can_see(pull.owner):
            raise NotFound("pull", pull_id)
        return pull

    def public(self, pull: Pull) -> PullPublic:
        done = cache_bytes(cache_dir(pull.source, self.layout), pull.repo_id, pull.source)
        if pull.state == "completed" and pull.total_bytes is not None:
            done = max(done, pull.total_bytes)
        return PullPublic(id=pull.id, repo_id=pull.repo_id, source=pull.source, revision=pull.revision,  # type: ignore[arg-type]
                          name=pull.name, status=pull.state, files=pull.files,  # type: ignore[arg-type]
                          total_bytes=pull.total_bytes, bytes_done=done, error=pull.error, model=pull.model)

