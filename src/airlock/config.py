"""Settings from ``AIRLOCK_*`` environment variables: data dir, database URL, limits."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class WitnessEndpoint(BaseModel):
    """A witness the gateway asks to cosign its checkpoints: its submission URL and verifier key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(min_length=1, description="Submission prefix; `<url>/add-checkpoint` is posted to.")
    key: str = Field(min_length=1, description="The witness's verifier key (`airlock witness pubkey`).")


class Settings(BaseSettings):
    """Process-wide settings; every field can be set as ``AIRLOCK_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="AIRLOCK_", extra="ignore")

    home: Path = Field(default=Path("~/.airlock"), description="Data directory (database, artifacts, caches).")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in the data dir.")
    manifest: Path | None = Field(default=None, description="Lab manifest; default `<home>/airlock.yaml`.")
    policy: Path | None = Field(default=None, description="Frontier-safety policy; default `<home>/policy.yaml`.")
    model_cache: Path | None = Field(
        default=None, description="Where converted model weights are cached; default `<home>/models`."
    )
    redis_url: str | None = Field(default=None, description="Redis URL for shared rate-limit counters (optional).")
    host: str = "127.0.0.1"
    port: int = 8000
    auth_cache_ttl_s: float = Field(
        default=5.0,
        ge=0,
        description="How long an authenticated key is answered without reading the database (0: never); "
        "revocations empty the cache of every process at once.",
    )
    access_log: bool = Field(
        default=False, description="Log every HTTP request (uvicorn's access log); the audit trail records them anyway."
    )
    audit_flush_interval_s: float = Field(default=0.05, description="Max delay before audit events hit the DB.")
    audit_batch_size: int = Field(default=200, description="Audit events written per transaction at most.")
    max_request_bytes: int = Field(default=4 * 1024 * 1024, description="Largest accepted request body.")
    run_jobs: bool = Field(default=True, description="Run the job worker (fine-tuning) inside the gateway.")
    job_stale_after_s: float = Field(
        default=30.0, gt=0, description="A running job whose heartbeat is older than this is recovered."
    )
    executor: Literal["inprocess", "ray"] = Field(
        default="inprocess",
        description="Where model workers and jobs run: `inprocess` (the gateway's own threads) or `ray` (actors "
        "and tasks on a Ray cluster, placed on nodes holding the weights; the gateway holds none).",
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster to join with `AIRLOCK_EXECUTOR=ray` (e.g. `ray-head:6379`, or `auto`); "
        "unset: a local one-node cluster started by the process (development only).",
    )
    ray_namespace: str = Field(default="airlock", description="Ray namespace of the model worker actors.")
    artifacts: Path | None = Field(
        default=None,
        description="Artifact store every node reaches (uploaded files, checkpoints, adapters, interp results); "
        "default: the data dir. With `AIRLOCK_EXECUTOR=ray` it must be a shared mount.",
    )
    max_file_bytes: int = Field(default=10 * 1024 * 1024, description="Largest fine-tuning file upload.")
    interp_wall_timeout_s: float = Field(default=300.0, gt=0, description="Wall-clock limit of one interp job.")
    interp_cpu_seconds: int = Field(default=120, gt=0, description="Sandbox CPU-seconds limit of one interp job.")
    interp_memory_mb: int = Field(default=2048, gt=0, description="Address-space limit of an interp runner (MiB).")
    interp_warm_runners: int = Field(
        default=2,
        ge=0,
        description="Sandboxed interp runners kept started ahead of their jobs, per set of limits in use (each "
        "serves one job, then is destroyed); 0 starts each job's runner when the job starts.",
    )
    interp_warm_idle_s: float = Field(
        default=600.0, gt=0, description="A warm interp runner unused this long is killed (and not replaced)."
    )
    interp_result_ttl_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="Under retention_interp=none, how long an interp result and its logs wait to be fetched.",
    )
    interp_max_code_bytes: int = Field(default=256 * 1024, gt=0, description="Largest interp code file.")
    interp_max_result_bytes: int = Field(default=16 * 1024 * 1024, gt=0, description="Largest result of one job.")
    interp_review_over_bytes: int = Field(
        default=1024 * 1024, ge=0, description="Interp results larger than this wait for a lab reviewer."
    )
    interp_log_bytes: int = Field(default=256 * 1024, gt=0, description="Logs kept per interp job (each stream).")
    interp_max_patch_norm_ratio: float = Field(
        default=8.0, gt=0, description="Largest interp patch, per position, as a multiple of the activation it edits."
    )
    interp_default_grant_result_bytes: int = Field(
        default=32 * 1024 * 1024, gt=0, description="Interp result bytes of a grant that sets no quota of its own."
    )
    interp_served_review_fraction: float = Field(
        default=0.001,
        gt=0,
        le=1,
        description="Activation, logit and text bytes served into a grant's interp sandboxes past which its results "
        "wait for review, as a fraction of the model's parameter bytes (grants may set their own threshold).",
    )
    interp_served_budget_fraction: float = Field(
        default=0.01,
        gt=0,
        le=1,
        description="Bytes a grant's interp jobs may be served in all, as a fraction of the model's parameter bytes "
        "(grants may set their own quota).",
    )
    interp_max_reply_bytes: int = Field(
        default=256 * 1024 * 1024, gt=0, description="Largest reply of one interp RPC call, estimated before it runs."
    )
    interp_host_memory_mb: int = Field(
        default=1024, gt=0, description="Host memory one interp RPC call may need, estimated before it runs (MiB)."
    )
    report_publish_interval_s: float = Field(
        default=60.0, gt=0, description="How often the gateway publishes reports whose embargo has passed."
    )
    ledger_origin: str = Field(
        default="airlock.invalid/ledger", description="Ledger origin line and key name in signed checkpoints."
    )
    ledger_key: Path | None = Field(
        default=None, description="Ledger Ed25519 signing key (PEM); default `<home>/ledger/signing-key.pem`."
    )
    grant_seal_key: SecretStr | None = Field(
        default=None,
        description="Key of the grant seals (hex, at least 32 bytes); default: the file `<home>/grant-seal.key`, "
        "created on first start while no grant is sealed. Keep it out of the database and its backups.",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token a Prometheus server presents to scrape /metrics (lab tokens whose role reads the "
        "audit trail may scrape too). Unset: only those lab tokens.",
    )
    ledger_sequence_interval_s: float = Field(
        default=1.0, gt=0, description="How often the gateway integrates pending ledger events."
    )
    ledger_checkpoint_interval_s: float = Field(
        default=300.0, gt=0, description="How often the gateway digests the audit table and signs a checkpoint."
    )
    calendar: str = Field(
        default="eu",
        description="Business-day calendar: `eu` (weekends and the EU institutions' shared holidays), `weekends`, "
        "or a holiday file (YAML: name, base, weekend, holidays).",
    )
    ledger_witnesses: list[WitnessEndpoint] = Field(
        default_factory=list,
        description='Witnesses asked to cosign each new checkpoint, as JSON: `[{"url": ..., "key": ...}]`.',
    )
    ledger_witness_timeout_s: float = Field(
        default=5.0, gt=0, description="How long the gateway waits for one witness before retrying it later."
    )
    ledger_cosign_interval_s: float = Field(
        default=2.0, gt=0, description="How often the gateway asks witnesses missing from the newest checkpoint."
    )

    @property
    def home_dir(self) -> Path:
        """Return the expanded data directory."""
        return self.home.expanduser()

    @property
    def artifacts_dir(self) -> Path:
        """Return the artifact store's directory (the data dir unless ``AIRLOCK_ARTIFACTS`` names a shared one)."""
        return (self.artifacts or self.home_dir).expanduser()

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
    def policy_path(self) -> Path:
        """Return the frontier-safety policy path (read by the deployment gate)."""
        return (self.policy or self.home_dir / "policy.yaml").expanduser()

    @property
    def ledger_key_path(self) -> Path:
        """Return the ledger signing key path."""
        return (self.ledger_key or self.home_dir / "ledger" / "signing-key.pem").expanduser()

    @property
    def grant_seal_key_path(self) -> Path:
        """Return the grant seal key file (used when ``grant_seal_key`` is not set)."""
        return self.home_dir / "grant-seal.key"

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
