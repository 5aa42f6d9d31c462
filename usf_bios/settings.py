"""Environment settings, read once per process.

Every variable of ARCHITECTURE's table, with its default. Paths left unset are derived
from ``USF_HOME``. Use ``get_settings()``; tests that change the environment call
``get_settings.cache_clear()``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MODEL_SOURCES = ("local", "huggingface", "modelscope")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", populate_by_name=True)

    usf_home: Path = Field(Path("~/.usf-bios"), validation_alias="USF_HOME", description="Storage root.")
    output_path: Path | None = Field(None, validation_alias="OUTPUT_PATH", description="Finished adapters, one folder per job.")
    checkpoint_path: Path | None = Field(None, validation_alias="CHECKPOINT_PATH", description="Checkpoints, one folder per job.")
    log_path: Path | None = Field(None, validation_alias="LOG_PATH", description="Job logs and event streams.")
    model_path: Path | None = Field(None, validation_alias="USF_MODEL_PATH", description="Model folders named {org}--{model}.")
    hf_home: Path | None = Field(None, validation_alias="HF_HOME", description="Hugging Face home; its hub/ is the cache.")
    transformers_cache: Path | None = Field(None, validation_alias="TRANSFORMERS_CACHE", description="Hugging Face hub cache.")
    modelscope_cache: Path | None = Field(None, validation_alias="MODELSCOPE_CACHE", description="ModelScope cache.")
    supported_model_sources: Annotated[tuple[str, ...], NoDecode] = Field(
        MODEL_SOURCES, validation_alias="SUPPORTED_MODEL_SOURCES", description="Comma-separated: local,huggingface,modelscope."
    )
    database_url: str | None = Field(None, validation_alias="DATABASE_URL", description="SQLAlchemy URL of the job store.")
    host: str = Field("127.0.0.1", validation_alias="USF_HOST", description="Address the server binds to.")
    port: int = Field(8000, ge=1, le=65535, validation_alias="USF_PORT", description="Port the server binds to.")

    @field_validator("supported_model_sources", mode="before")
    @classmethod
    def _split_sources(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(part.strip().lower() for part in value.split(",") if part.strip())
        unknown = [v for v in value if v not in MODEL_SOURCES]  # type: ignore[union-attr]
        if unknown:
            raise ValueError(f"unknown model source(s) {unknown}; allowed: {', '.join(MODEL_SOURCES)}")
        return value

    @model_validator(mode="after")
    def _derive_paths(self) -> "Settings":
        home = self.usf_home.expanduser()
        self.usf_home = home
        data = home / "data"
        self.output_path = (self.output_path or data / "output").expanduser()
        self.checkpoint_path = (self.checkpoint_path or data / "checkpoints").expanduser()
        self.log_path = (self.log_path or data / "logs").expanduser()
        self.model_path = (self.model_path or home / "models").expanduser()
        self.hf_home = (self.hf_home or home / "cache").expanduser()
        self.transformers_cache = (self.transformers_cache or self.hf_home / "hub").expanduser()
        self.modelscope_cache = (self.modelscope_cache or home / "cache" / "modelscope").expanduser()
        if self.database_url is None:
            self.database_url = f"sqlite:///{data / 'usf.db'}"
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings()
