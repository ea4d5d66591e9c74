"""The FastAPI application factory: wires settings, database, audit, backends and routers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select
from starlette.types import ASGIApp, Receive, Scope, Send

import airlock.schema  # noqa: F401  (every table and section of grant terms, installed entry points or not)
from airlock import __version__
from airlock.access.audit import AUDIT_DIGEST, AuditWriter
from airlock.access.cache import ACCESS_CHANNEL, AuthCache
from airlock.access.metrics import CONTENT_TYPE, GatewayMetrics
from airlock.access.middleware import AuditContext, AuditMiddleware, OptionsMiddleware
from airlock.access.quotas import make_rate_limiter
from airlock.access.roles import Permission
from airlock.access.routes import grant_router, sealed_admin_router, sealed_router
from airlock.access.routes import router as access_router
from airlock.access.seal import prepare_grant_seals
from airlock.access.service import AdminPrincipal
from airlock.backends.base import ModelBackend
from airlock.backends.pool import BackendPool, VariantRuntimeSpec, weights_spec
from airlock.backends.registry import create_backend
from airlock.config import Settings, get_settings
from airlock.console.routes import install as install_console
from airlock.contamination.routes import admin_router as contamination_admin_router
from airlock.contamination.routes import router as contamination_router
from airlock.db import Database
from airlock.deps import GatewayState, RequirePermission, get_admin, get_audit, get_principal, get_state
from airlock.errors import InvalidRequestError, NotFoundError
from airlock.evals.routes import admin_router as results_admin_router
from airlock.evals.routes import router as results_router
from airlock.finetune.jobs import KIND, FineTuneHandler
from airlock.finetune.noise import KIND as NOISE_KIND
from airlock.finetune.noise import NoiseHandler
from airlock.finetune.routes import noise_router
from airlock.finetune.routes import router as files_router
from airlock.governance.routes import router as governance_router
from airlock.governance.routes import stage_router
from airlock.governance.service import refuse_gated_manifest_stages
from airlock.interp.jobs import KIND as INTERP_KIND
from airlock.interp.jobs import InterpHandler, backend_workers, pool_workers, warm_runners
from airlock.interp.routes import router as interp_router
from airlock.interp.service import UnfetchedSweeper
from airlock.jobs.executor import JobExecutor
from airlock.jobs.runner import JobHandler, JobRunner
from airlock.ledger.cosign import CheckpointCosigner
from airlock.ledger.routes import admin_router as ledger_admin_router
from airlock.ledger.routes import router as ledger_router
from airlock.ledger.service import LedgerSequencer
from airlock.mitigations import check_manifest
from airlock.publish.routes import router as publish_router
from airlock.publish.service import DuePublisher
from airlock.redteam.routes import admin_router as redteam_admin_router
from airlock.redteam.routes import router as redteam_router
from airlock.registry.models import Variant
from airlock.registry.routes import router as registry_router
from airlock.registry.service import RegistryCache, load_manifest, sync_manifest
from airlock.serving.pipelines import NoisedExpiry, PipelineCache
from airlock.serving.routes import SamplingFastPath, airlock_router, tokenizer_router
from airlock.serving.routes import router as openai_router
from airlock.web.errors import install_error_handlers
from airlock.web.health import Readiness
from airlock.web.openapi import EVALUATOR_SCHEME, LAB_SCHEME, install_openapi

log = logging.getLogger(__name__)


def bootstrap(settings: Settings, db: Database, *, sync: bool = True) -> None:
    """Check the schema is migrated, load the grant seal key and, when a manifest exists, sync it into the registry.

    Migrating is ``airlock migrate``'s job alone: replicas starting together must not race over the schema.
    """
    db.require_migrated()
    # A missing or replaced seal key stops the start here, with a message that says which.
    prepare_grant_seals(db, settings)
    path = settings.manifest_path
    if sync and path.exists():
        manifest = load_manifest(path)
        check_manifest(manifest)
        with db.session() as session:
            # A manifest must not move a version into a gated stage behind the gate's back.
            refuse_gated_manifest_stages(session, manifest, settings.policy_path)
            report = sync_manifest(session, manifest)
        for line in report.created + report.updated:
            log.info("manifest: %s", line)


def job_handlers(
    settings: Settings, db: Database, pool: BackendPool, loop: asyncio.AbstractEventLoop
) -> dict[str, JobHandler]:
    """Return the handler of every job kind (the gateway's in-process runner and ``airlock worker`` share them)."""
    interp = InterpHandler(db, settings, pool_workers(pool, loop), warm_runners(settings))
    return {KIND: FineTuneHandler(settings.artifacts_dir), INTERP_KIND: interp, NOISE_KIND: NoiseHandler()}


def prime_warm_runners(handlers: dict[str, JobHandler], executor: JobExecutor | None) -> None:
    """Start the interp handler's warm runners now, so a server's first interp job does not start one cold.

    Only where jobs run in this process's threads: on the Ray plane, interp runs in model workers.
    """
    interp = handlers.get(INTERP_KIND)
    if executor is None and isinstance(interp, InterpHandler):
        interp.prime()


def remote_job_handler(kind: str, settings: Settings, db: Database, backend: Any) -> JobHandler:
    """Build a job kind's handler on the Ray node running the job (``backend``: the model worker's own weights)."""
    if kind == KIND:
        return FineTuneHandler(settings.artifacts_dir)
    if kind == NOISE_KIND:
        return NoiseHandler()
    if kind == INTERP_KIND and backend is not None:
        return InterpHandler(db, settings, backend_workers(backend))
    raise ValueError(f"no remote handler for job kind {kind!r}")


def job_executor(settings: Settings, db: Database) -> JobExecutor | None:
    """Return where jobs run: None for the runner's own threads, or the Ray cluster with ``AIRLOCK_EXECUTOR=ray``."""
    if settings.executor != "ray":
        return None
    # Ray loads only in a process configured for it: the embedded default never imports it.
    from airlock.cluster.executor import RayExecutor, Route
    from airlock.cluster.placement import placement_of

    def route(kind: str, params: dict[str, Any]) -> Route:
        if kind == KIND:
            return Route(placement=placement_of({"model": params["base_model"], "device": params.get("device")}))
        if kind == NOISE_KIND:  # reads the base weights once, wherever they are
            return Route(placement=placement_of({"model": params["base_weights"]}))
        with db.session() as session:
            variant = session.get(Variant, params["variant_id"])
            if variant is None:
                raise NotFoundError("the job's variant no longer exists")
            spec = VariantRuntimeSpec(variant.id, variant.backend, dict(variant.backend_config), [])
        local = weights_spec(spec)
        if local is None:
            raise InvalidRequestError(
                f"variant {params.get('model')} has no lab-side weights a model worker can load",
                code="backend_not_supported",
            )
        return Route(worker_config=local.backend_config)

    return RayExecutor(settings, route, remote_job_handler)


def backend_pool(settings: Settings) -> BackendPool:
    """Return the backend pool: local weights in this process, or on Ray model workers with ``AIRLOCK_EXECUTOR=ray``."""
    if settings.executor != "ray":
        return BackendPool()
    from airlock.cluster.worker import RayModelBackend  # Ray only where configured, as above

    def create(spec: VariantRuntimeSpec) -> ModelBackend:
        if spec.backend == "local":
            return RayModelBackend(spec.backend_config, settings)
        return create_backend(spec.backend, spec.backend_config)

    return BackendPool(create)


def served_backends(db: Database) -> list[VariantRuntimeSpec]:
    """Return one runtime spec per distinct backend the registry's variants use (what start-up loads)."""
    specs: dict[str, VariantRuntimeSpec] = {}
    with db.session() as session:
        for variant in session.scalars(select(Variant).order_by(Variant.created_at)):
            spec = VariantRuntimeSpec(variant.id, variant.backend, dict(variant.backend_config), [])
            specs.setdefault(spec.backend_key(), spec)
    return list(specs.values())


def backend_label(spec: VariantRuntimeSpec) -> str:
    """Name a backend for start-up progress (its kind and weights or upstream, never a key)."""
    config = spec.backend_config
    what = config.get("model") or config.get("upstream_model") or config.get("base_url") or spec.variant_id
    return f"{spec.backend} backend {what}"


async def load_backends(pool: BackendPool, specs: list[VariantRuntimeSpec], readiness: Readiness) -> None:
    """Start every backend in ``specs`` (loading weights), logging progress; a failure keeps the process unready."""
    for spec in specs:
        label = backend_label(spec)
        readiness.begin(label)
    readiness.open()
    for spec in specs:
        label = backend_label(spec)
        log.warning("start-up: loading %s ...", label)
        try:
            await pool.backend(spec)
        except Exception as exc:
            log.exception("start-up: loading %s failed; /readyz stays 503", label)
            readiness.finish(label, error=f"{type(exc).__name__}: {exc}")
            continue
        readiness.finish(label)
        log.warning("start-up: %s loaded", label)
    if readiness.ready:
        log.warning("start-up: ready (every backend loaded)")


class MetricsScraper(RequirePermission):
    """Who may scrape ``/metrics``: ``AIRLOCK_METRICS_TOKEN``, or a lab token whose role reads the audit trail."""

    def __init__(self) -> None:
        super().__init__(Permission.AUDIT_READ)

    async def __call__(  # type: ignore[override]
        self,
        request: Request,
        state: Annotated[GatewayState, Depends(get_state)],
        audit: Annotated[AuditContext, Depends(get_audit)],
    ) -> AdminPrincipal | None:
        """Accept the scrape token (constant-time compare), else check a lab token like any admin route."""
        import hmac

        expected = state.settings.metrics_token
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if expected is not None and given and hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
            audit.actor_type, audit.actor = "admin", "metrics-scraper"
            return None
        admin = await run_in_threadpool(get_admin, request, state, audit)
        return await super().__call__(admin, audit)


class GatewayApp(FastAPI):
    """The gateway's FastAPI application, with the sampling fast path in front of its middleware stack.

    Non-streaming sampling requests are answered by :class:`SamplingFastPath` without passing
    through FastAPI's and Starlette's layers (error middleware, OpenTelemetry hooks, which Airlock
    does not configure, body limit, which it does not set: the audit middleware enforces its own);
    every other request, and every one the fast path declines, takes the whole stack.
    """

    fast_path: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if self.fast_path is not None and scope["type"] == "http":
            scope["app"] = self  # as Starlette sets it: the fast path reads the gateway's state from it
            await self.fast_path(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def full_stack(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call with FastAPI's whole stack (what the fast path hands on)."""
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    db: Database | None = None,
    sync_manifest: bool = True,
    load_weights: bool = False,
) -> FastAPI:
    """Build the Airlock HTTP application.

    With ``load_weights`` every backend is started right after start-up (``/readyz`` turns 200 once all
    have loaded); without it backends start on first use and the process is ready as soon as it serves.
    """
    settings = settings or get_settings()
    db = db or Database(settings.db_url)
    audit = AuditWriter(db, flush_interval=settings.audit_flush_interval_s, batch_size=settings.audit_batch_size)
    pool = backend_pool(settings)
    state = GatewayState(
        settings=settings,
        db=db,
        audit=audit,
        pool=pool,
        pipelines=PipelineCache(pool),
        limiter=make_rate_limiter(settings.redis_url),
        registry=RegistryCache(),
        auth=AuthCache(settings.auth_cache_ttl_s),
    )
    readiness = Readiness()
    # Noise-injected variants' copies of the weights are closed at their expiry, not at the next request.
    noised_expiry = NoisedExpiry(state.pipelines)
    metrics = GatewayMetrics(db, lambda: {"audit": audit.queued()})
    audit.observers.append(metrics.observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        readiness.begin("database")
        await run_in_threadpool(bootstrap, settings, db, sync=sync_manifest)
        # Any process revoking a key or grant empties this process's authentication cache at once.
        stop_listening = db.signals.subscribe(ACCESS_CHANNEL, state.auth.invalidate)
        readiness.finish("database")
        audit.start()

        ledger = LedgerSequencer(db, settings, AUDIT_DIGEST)
        ledger.start()
        # Its own thread: a slow or absent witness never holds up sequencing or signing.
        cosigner = CheckpointCosigner(db, settings) if settings.ledger_witnesses else None
        if cosigner is not None:
            cosigner.start()

        publisher = DuePublisher(db, settings.report_publish_interval_s)
        publisher.start()
        noised_expiry.start()
        runner = None
        sweeper = None
        handlers: dict[str, JobHandler] = {}
        executor: JobExecutor | None = None
        if settings.run_jobs:
            # Interp results and logs never fetched are dropped after a bounded time under retention `none`.
            sweeper = UnfetchedSweeper(db, settings)
            sweeper.start()
            handlers = job_handlers(settings, db, state.pool, asyncio.get_running_loop())
            executor = job_executor(settings, db)
            runner = JobRunner(db, handlers, stale_after=settings.job_stale_after_s, executor=executor)
        loading: asyncio.Task[None] | None = None
        if load_weights:
            specs = await run_in_threadpool(served_backends, db)

            async def load_then_run_jobs() -> None:
                await load_backends(state.pool, specs, readiness)
                # Jobs start once the weights are in: a job thread importing the ML stack while the
                # loader does can see a half-initialised module.
                if runner is not None:
                    await run_in_threadpool(runner.start)
                    # A served gateway (not an app built per test) has its first interp job find a warm runner.
                    prime_warm_runners(handlers, executor)

            loading = asyncio.create_task(load_then_run_jobs())
        else:
            readiness.open()
            if runner is not None:
                runner.start()
        try:
            yield
        finally:
            stop_listening()
            if loading is not None and not loading.done():
                loading.cancel()
            if runner is not None:
                await run_in_threadpool(runner.stop)
            await noised_expiry.stop()
            state.pipelines.clear()
            await state.pool.aclose()
            await state.limiter.aclose()
            audit.close()
            await run_in_threadpool(publisher.stop)
            if sweeper is not None:
                await run_in_threadpool(sweeper.stop)
            await run_in_threadpool(ledger.stop)
            if cosigner is not None:
                await run_in_threadpool(cosigner.stop)

    app = GatewayApp(
        title="Airlock",
        # Served by the console from packaged assets instead of FastAPI's CDN-backed pages.
        docs_url=None,
        redoc_url=None,
        version=__version__,
        summary="Structured pre-deployment access to frontier models for external evaluators.",
        lifespan=lifespan,
    )
    app.state.gateway = state
    app.state.noised_expiry = noised_expiry
    app.state.readiness = readiness
    app.state.metrics = metrics
    install_error_handlers(app)
    install_openapi(app, {EVALUATOR_SCHEME: get_principal, LAB_SCHEME: get_admin})

    app.include_router(openai_router)
    app.include_router(airlock_router)
    app.include_router(tokenizer_router)
    app.include_router(registry_router)
    app.include_router(access_router)
    app.include_router(grant_router)
    app.include_router(results_router)
    app.include_router(results_admin_router)
    app.include_router(files_router)
    app.include_router(noise_router)
    app.include_router(interp_router)
    app.include_router(governance_router)
    app.include_router(stage_router)
    app.include_router(ledger_router)
    app.include_router(ledger_admin_router)
    app.include_router(publish_router)
    app.include_router(redteam_router)
    app.include_router(redteam_admin_router)
    app.include_router(contamination_router)
    app.include_router(contamination_admin_router)
    app.include_router(sealed_router)
    app.include_router(sealed_admin_router)
    install_console(app)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """Liveness and database check."""
        from sqlalchemy import text

        with db.session() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """Readiness: 200 once start-up is done and every backend's weights are loaded, 503 until then."""
        report = readiness.report()
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    @app.get("/metrics", tags=["ops"])
    def prometheus_metrics(_scraper: Annotated[AdminPrincipal | None, Depends(MetricsScraper())]) -> Response:
        """Prometheus metrics (requests, latency, tokens per grant, jobs, queues); no request content."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # Added before the audit middleware, so it runs inside it: OPTIONS requests are audited too.
    app.add_middleware(OptionsMiddleware)
    limits = {"max_body_bytes": settings.max_request_bytes, "max_upload_bytes": settings.max_file_bytes}
    app.add_middleware(AuditMiddleware, writer=audit, **limits)
    # Outside all of it: the sampling fast path, audited by the same middleware's code, hands
    # whatever it does not serve itself to the whole stack above.
    app.fast_path = SamplingFastPath(app.full_stack, AuditMiddleware(app.full_stack, audit, **limits))
    return app


def worker_app() -> FastAPI:
    """Build the app in one of ``airlock serve --workers N``'s processes (the parent has migrated and synced)."""
    return create_app(get_settings(), sync_manifest=False, load_weights=True)
