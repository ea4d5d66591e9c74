"""Settings from ``AIRLOCK_*`` environment variables: data dir, database URL, limits."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Process-wide settings; every field can be set as ``AIRLOCK_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="AIRLOCK_", extra="ignore")

    home: Path = Field(default=Path("~/.airlock"), description="Data directory (database, artifacts, caches).")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in the data dir.")
    manifest: Path | None = Field(default=None, description="Lab manifest; default `<home>/airlock.yaml`.")
    model_cache: Path | None = Field(
        default=None, description="Where converted model weights are cached; default `<home>/models`."
    )
    redis_url: str | None = Field(default=None, description="Redis URL for shared rate-limit counters (optional).")
    host: str = "127.0.0.1"
    port: int = 8000
    audit_flush_interval_s: float = Field(default=0.05, description="Max delay before audit events hit the DB.")
    audit_batch_size: int = Field(default=200, description="Audit events written per transaction at most.")
    max_request_bytes: int = Field(default=4 * 1024 * 1024, description="Largest accepted request body.")
    run_jobs: bool = Field(default=True, description="Run the job worker (fine-tuning) inside the gateway.")
    job_stale_after_s: float = Field(
        default=30.0, gt=0, description="A running job whose heartbeat is older than this is recovered."
    )
    max_file_bytes: int = Field(default=10 * 1024 * 1024, description="Largest fine-tuning file upload.")

    @property
    def home_dir(self) -> Path:
        """Return the expanded data directory."""
        return self.home.expanduser()

    @property
    def db_url(self) -> str:
        """Return the database URL, defaulting to SQLite in the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home_dir / 'airlock.db'}"

    @property
    def manifest_path(self) -> Path:
        """Return the lab manifest path."""
        return (self.manifest or self.home_dir / "airlock.yaml").expanduser()

    @property
    def model_cache_dir(self) -> Path:
        """Return the directory for converted model weights."""
        return (self.model_cache or self.home_dir / "models").expanduser()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process settings (read once from the environment)."""
    return Settings()


def reset_settings() -> None:
    """Forget cached settings so the next call re-reads the environment (tests, CLI)."""
    get_settings.cache_clear()
