"""`airlock interp` commands: evaluators submit code and fetch results; lab reviewers release them.

Evaluator commands talk to the lab over HTTP (``AIRLOCK_BASE_URL``, ``AIRLOCK_API_KEY``);
``airlock interp review ...`` works on the lab's database directly, like other lab commands.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from airlock.cli_support import console, fail, fmt_ts, open_database, run_command

app = typer.Typer(
    help="Remote interpretability: evaluator code runs sandboxed against private weights; only results leave.",
    no_args_is_help=True,
)
review_app = typer.Typer(
    help="Lab side: review held interp results (approve / deny with a reason).", no_args_is_help=True
)
app.add_typer(review_app, name="review")

_TERMINAL = ("succeeded", "awaiting_review", "denied", "failed", "cancelled")
_API = "/airlock/interp"


class _Lab:
    """The lab's interp endpoints, for the evaluator commands."""

    def __init__(self) -> None:
        from airlock.evals.client import LabClient

        self._client = LabClient.from_env()
        self.base_url = self._client.base_url

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; raise an AirlockError with the lab's message on HTTP errors."""
        return self._client.send(method, path, timeout=120, **kwargs)


def _rss(kib: Any) -> str:
    """Format the sandbox's peak memory (0: it could not be told apart from the host process)."""
    return f"{int(kib) // 1024} MiB" if kib else "n/a"


def _parse_args(pairs: list[str], args_json: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if args_json:
        try:
            loaded = json.loads(args_json)
        except ValueError as exc:
            raise fail(f"--args-json is not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise fail("--args-json must be a JSON object")
        args.update(loaded)
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name.isidentifier():
            raise fail(f"--arg takes NAME=VALUE, not {pair!r}")
        try:
            args[name] = json.loads(raw)  # numbers, lists, true/false ...
        except ValueError:
            args[name] = raw  # ... and anything else as a string
    return args


def _show_job(job: dict[str, Any], *, logs: bool = True) -> None:
    usage = job.get("usage") or {}
    rpc = usage.get("rpc") or {}
    console.print(f"[bold]{job['id']}[/]  {job['model']}  status=[bold]{job['status']}[/]")
    console.print(f"  code {job['filename']}:{job['entry_point']}  sha256 {job['code_sha256'][:16]}…")
    if usage:
        console.print(
            f"  cpu {usage.get('cpu_seconds', 0):.2f}s  wall {usage.get('wall_seconds', 0):.2f}s  "
            f"rss {_rss(usage.get('max_rss_kib'))}  rpc calls {sum((rpc.get('calls') or {}).values())}  "
            f"model {rpc.get('model_seconds', 0):.2f}s  result {job['result_bytes']} bytes"
        )
    if job.get("review", {}).get("state") not in (None, "none"):
        review = job["review"]
        console.print(f"  review: {review['state']} {'; '.join(review['reasons'])} {review.get('note') or ''}")
    if job.get("error"):
        console.print(f"  [red]error ({job['error']['code']}): {job['error']['message']}[/]")
    if logs and job.get("logs"):
        console.print("  logs:")
        for line in job["logs"].rstrip().splitlines()[-40:]:
            console.print(f"  │ {line}", markup=False, highlight=False)


@app.command("submit")
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Python file to run in the lab.")],
    model: Annotated[str, typer.Option(help="Target {model}/{variant}.")],
    entry: Annotated[str, typer.Option(help="Function to call.")] = "main",
    arg: Annotated[list[str] | None, typer.Option(help="NAME=VALUE keyword argument (VALUE parsed as JSON).")] = None,
    args_json: Annotated[str | None, typer.Option(help="Keyword arguments as one JSON object.")] = None,
    cpu_seconds: Annotated[int | None, typer.Option(help="Lower the CPU limit.")] = None,
    wall_seconds: Annotated[float | None, typer.Option(help="Lower the wall-clock limit.")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Lower the memory limit (MiB).")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the job's progress until it ends.")] = False,
    out: Annotated[Path | None, typer.Option(help="With --wait: save the result here.")] = None,
) -> None:
    """Submit FILE to run against a granted variant; print the job id (and follow it with --wait)."""

    def body() -> None:
        lab = _Lab()
        limits = {"cpu_seconds": cpu_seconds, "wall_seconds": wall_seconds, "memory_mb": memory_mb}
        payload = {
            "model": model,
            "code": file.read_text(),
            # The lab accepts plain names only; anything else becomes '_' (it is only shown in tracebacks).
            "filename": re.sub(r"[^A-Za-z0-9_.-]", "_", file.stem)[:190] + ".py",
            "entry_point": entry,
            "args": _parse_args(arg or [], args_json),
            "limits": {k: v for k, v in limits.items() if v is not None} or None,
        }
        job = lab.request("POST", f"{_API}/jobs", json=payload).json()
        console.print(f"submitted [bold]{job['id']}[/] ({job['status']})")
        if not wait:
            return
        job = _follow(lab, job["id"])
        _show_job(job)
        if job["status"] == "succeeded" and out is not None:
            _download(lab, job["id"], out)
        if job["status"] not in ("succeeded", "awaiting_review"):
            raise typer.Exit(1)

    run_command(body)


def _follow(lab: _Lab, job_id: str) -> dict[str, Any]:
    after: int | None = None
    while True:
        params = {"after": after} if after is not None else {}
        events = lab.request("GET", f"{_API}/jobs/{job_id}/events", params=params).json()["data"]
        for event in events:
            after = event["id"]
            console.print(f"  {event['created_at'][11:19]}  {event['message']}", highlight=False)
        job: dict[str, Any] = lab.request("GET", f"{_API}/jobs/{job_id}").json()
        if job["status"] in _TERMINAL:
            return job
        time.sleep(0.5)


def _download(lab: _Lab, job_id: str, out: Path) -> None:
    result = lab.request("GET", f"{_API}/jobs/{job_id}/result").json()
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    arrays = lab.request("GET", f"{_API}/jobs/{job_id}/result.npz").content
    (out / "arrays.npz").write_bytes(arrays)
    names = ", ".join(f"{a['name']} {a['dtype']}{a['shape']}" for a in result["arrays"]) or "none"
    console.print(f"saved {out / 'result.json'} and {out / 'arrays.npz'} (arrays: {names})")
    value = result["value"]
    items = value.items() if isinstance(value, dict) else [("value", value)]
    for key, item in items:
        text = json.dumps(item, ensure_ascii=False)
        console.print(f"  {key}: {text if len(text) <= 100 else text[:100] + ' …'}", markup=False, highlight=False)


@app.command("status")
def status(job_id: str) -> None:
    """Show a job: status, resource use, error and the logs its code printed."""
    run_command(lambda: _show_job(_Lab().request("GET", f"{_API}/jobs/{job_id}").json()))


@app.command("result")
def result(
    job_id: str,
    out: Annotated[Path, typer.Option(help="Directory for result.json and arrays.npz.")] = Path("."),
) -> None:
    """Download a released result (JSON values + NPZ arrays) into --out."""
    run_command(lambda: _download(_Lab(), job_id, out))


@app.command("cancel")
def cancel(job_id: str) -> None:
    """Cancel a queued or running job."""
    run_command(lambda: _show_job(_Lab().request("POST", f"{_API}/jobs/{job_id}/cancel").json(), logs=False))


@app.command("list")
def list_jobs(limit: Annotated[int, typer.Option(min=1, max=100)] = 20) -> None:
    """List your interp jobs, newest first."""

    def body() -> None:
        jobs = _Lab().request("GET", f"{_API}/jobs", params={"limit": limit}).json()["data"]
        for job in jobs:
            console.print(f"{job['id']}  {job['created_at'][:19]}  {job['model']:<28} {job['status']}")
        if not jobs:
            console.print("no interp jobs")

    run_command(body)


# ---------------------------------------------------------------------------------- lab review


@review_app.command("list")
def review_list(
    state: Annotated[str, typer.Option(help="pending, approved, denied, none or all.")] = "pending",
) -> None:
    """List interp jobs by review state (held results by default)."""
    from airlock.interp import service

    def body() -> None:
        with open_database() as (_settings, db), db.session() as session:
            rows = service.list_for_review(session, state=None if state == "all" else state, limit=500)
            for job, row in rows:
                console.print(
                    f"{job.id}  {fmt_ts(job.created_at)}  {row.model:<28} {service.public_status(job, row):<16} "
                    f"{row.result_bytes:>10} B  {'; '.join(row.review_reasons)}",
                    highlight=False,
                )
            if not rows:
                console.print(f"no interp jobs in review state {state!r}")

    run_command(body)


@review_app.command("show")
def review_show(job_id: str) -> None:
    """Show a job with its code, arguments and logs."""
    from airlock.interp import service

    def body() -> None:
        with open_database() as (_settings, db), db.session() as session:
            item = service.to_review_item(*service.get_job_for_lab(session, job_id))
        _show_job(item.model_dump(mode="json"))
        console.print(f"  evaluator {item.evaluator_id}  grant {item.grant_id}  args {json.dumps(item.args)[:500]}")
        console.print("  code:")
        for line in item.code.splitlines():
            console.print(f"  ┃ {line}", markup=False, highlight=False)

    run_command(body)


def _decide(job_id: str, decision: str, reason: str, reviewer: str) -> None:
    from airlock.interp import service

    with open_database() as (settings, db):
        with db.session() as session:
            _job, row = service.decide(session, job_id, reviewer=reviewer, decision=decision, reason=reason)
            state = row.review_state
        if decision == "deny":
            service.discard_result(settings.artifacts_dir, job_id)
    console.print(f"{job_id}: result {state}")


@review_app.command("approve")
def review_approve(
    job_id: str,
    reviewer: Annotated[str, typer.Option(help="Your name, recorded with the decision.")] = "lab-reviewer",
    note: Annotated[str, typer.Option(help="Optional note.")] = "",
) -> None:
    """Release a held result to its evaluator."""
    run_command(lambda: _decide(job_id, "approve", note, reviewer))


@review_app.command("deny")
def review_deny(
    job_id: str,
    reason: Annotated[str, typer.Option(help="Why (shown to the evaluator).")],
    reviewer: Annotated[str, typer.Option(help="Your name, recorded with the decision.")] = "lab-reviewer",
) -> None:
    """Refuse a held result (it is deleted); the reason is shown to the evaluator."""
    run_command(lambda: _decide(job_id, "deny", reason, reviewer))
