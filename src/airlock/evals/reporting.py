"""Turn Inspect eval logs into attestations, and compare variants on the same task."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airlock.evals.attestation import SCHEMA, file_sha256, mean_with_ci, paired_difference
from airlock.evals.suites import SUITE_MODULES, canonical_hash
from airlock.ids import is_noised, parse_noised_id

PROVIDER_PREFIXES = ("airlock/",)


def model_id_from_log_model(name: str) -> str:
    """Return Airlock's ``{model}/{variant}`` id from an Inspect model name.

    ``airlock/m/v`` (native provider) and ``openai-api/<service>/m/v`` (stock provider) both map
    to ``m/v``.
    """
    if name.startswith("airlock/"):
        return name.removeprefix("airlock/")
    if name.startswith("openai-api/"):
        parts = name.split("/", 2)
        if len(parts) == 3:
            return parts[2]
    raise ValueError(f"model {name!r} was not run through Airlock (expected airlock/... or openai-api/<svc>/...)")


def _float(value: Any) -> float | None:
    from inspect_ai.scorer import value_to_float

    try:
        result = value_to_float()(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(result) else float(result)


@dataclass
class LogSummary:
    """What an attestation needs from one eval log (one task × one model)."""

    path: Path
    task: str
    model_id: str
    status: str
    per_sample: dict[tuple[str, int], float]
    reported: dict[str, dict[str, float | None]]
    eval_metadata: dict[str, Any]
    elicitation: dict[str, Any]
    dataset_hash: str
    suite: str | None
    suite_version: str | None
    excluded: list[str] = field(default_factory=list)
    """Samples (``id#epoch``) whose score is not a number (NaN, unscorable): left out of the metric, counted."""


def _finite(value: Any) -> float | None:
    """Return ``value`` as a float, or None for NaN and infinities (JSON and RFC 8785 have no such numbers)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def summarize_log(path: Path) -> LogSummary:
    """Read an ``.eval`` log and extract per-sample scores, metrics and elicitation settings."""
    from inspect_ai.log import read_eval_log

    log = read_eval_log(str(path))
    per_sample: dict[tuple[str, int], float] = {}
    excluded: list[str] = []
    scorer_name = None
    if log.results and log.results.scores:
        scorer_name = log.results.scores[0].name
    samples = log.samples or []
    for sample in samples:
        if not sample.scores:
            continue
        score = sample.scores.get(scorer_name) if scorer_name else next(iter(sample.scores.values()))
        if score is None:
            continue
        value = _float(score.value)
        if value is not None:
            per_sample[(str(sample.id), int(sample.epoch))] = value
        else:
            excluded.append(f"{sample.id}#{sample.epoch}")
    # A metric Inspect reports as NaN (a grader that could not score) is kept as null, never as NaN.
    reported: dict[str, dict[str, float | None]] = {}
    for eval_score in log.results.scores if log.results else []:
        reported[eval_score.name] = {k: _finite(m.value) for k, m in eval_score.metrics.items()}
    metadata = dict(log.eval.metadata or {})
    task = log.eval.task.split("/")[-1]
    suite = metadata.get("suite") or (task if task in SUITE_MODULES else None)
    dataset_hash = metadata.get("dataset_hash") or canonical_hash(
        [[str(s.id), str(s.input), str(s.target)] for s in sorted(samples, key=lambda s: (str(s.id), s.epoch))]
    )
    plan = log.plan
    elicitation = {
        "epochs": int(log.eval.config.epochs or 1),
        "solver": [step.solver for step in plan.steps] if plan else [],
        "generate_config": plan.config.model_dump(exclude_none=True) if plan else {},
        "limit": log.eval.config.limit,
        "task_args": log.eval.task_args,
    }
    return LogSummary(
        path=path,
        task=task,
        model_id=model_id_from_log_model(log.eval.model),
        status=log.status,
        per_sample=per_sample,
        reported=reported,
        eval_metadata=metadata,
        elicitation=elicitation,
        dataset_hash=str(dataset_hash),
        suite=str(suite) if suite else None,
        suite_version=str(metadata["suite_version"]) if metadata.get("suite_version") else None,
        excluded=excluded,
    )


def build_attestation(
    summary: LogSummary,
    provenance: dict[str, Any],
    evaluator: str,
    provenance_source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the attestation for one log, given the variant's provenance and where it came from.

    Rule for scores that are not numbers: such samples are excluded from ``metrics`` and counted in
    ``excluded_samples`` (with their ids); reported metrics that are NaN are null.
    """
    if summary.status != "success":
        raise ValueError(f"{summary.path.name}: the eval did not finish (status {summary.status}); rerun it first")
    if not summary.per_sample:
        nan = f" ({len(summary.excluded)} sample(s) scored NaN or not a number, e.g. {summary.excluded[0]})"
        raise ValueError(f"{summary.path.name}: no scored samples{nan if summary.excluded else ''}")
    model_id = summary.model_id
    fine_tuned = model_id.startswith("ft:")
    noise: dict[str, Any] = {}
    if is_noised(model_id):
        # The noise parameters the lab loaded the variant with, from the id the log recorded.
        ref = parse_noised_id(model_id)
        noise = {"noise": {"sigma": ref.sigma, "seed": ref.seed, "job": ref.job_id}}
    return {
        "schema": SCHEMA,
        "evaluator": evaluator,
        "grant_id": provenance["grant_id"],
        "model": provenance["model"],
        "model_id": model_id,
        "version": provenance["version"],
        "version_hash": provenance["version_hash"],
        "variant": provenance["variant"],
        "mitigations": provenance.get("mitigations", []),
        "suite": summary.suite,
        "suite_version": summary.suite_version,
        "task": summary.task,
        "dataset_hash": summary.dataset_hash,
        "samples": len(summary.per_sample),
        "metrics": {"mean_score": mean_with_ci(list(summary.per_sample.values()))},
        "reported_metrics": summary.reported,
        "excluded_samples": {
            "count": len(summary.excluded),
            "samples": summary.excluded[:100],
            "rule": "scores that are not numbers (NaN, unscorable) are left out of metrics and counted here",
        },
        "provenance_source": provenance_source or {"from": "log"},
        "elicitation": {
            **summary.elicitation,
            "fine_tuned": fine_tuned,
            "finetune_job": model_id.rsplit(":", 1)[-1] if fine_tuned else None,
            **noise,
        },
        "log_file": summary.path.name,
        "log_sha256": file_sha256(summary.path),
        "created_at": datetime.now(UTC).isoformat(),
    }


def compare_logs(a: LogSummary, b: LogSummary) -> dict[str, Any]:
    """Compare two runs of the same task on paired samples: means, CIs and the paired difference."""
    if a.task != b.task or a.dataset_hash != b.dataset_hash:
        raise ValueError(f"cannot compare different tasks/datasets: {a.task} vs {b.task}")
    keys = sorted(set(a.per_sample) & set(b.per_sample))
    if not keys:
        raise ValueError("the two logs share no scored samples")
    xs = [a.per_sample[k] for k in keys]
    ys = [b.per_sample[k] for k in keys]
    return {
        "task": a.task,
        "a": {"model_id": a.model_id, **mean_with_ci(xs)},
        "b": {"model_id": b.model_id, **mean_with_ci(ys)},
        "difference_b_minus_a": paired_difference(xs, ys),
        "paired_samples": len(keys),
    }


def plot_comparison(comparisons: list[dict[str, Any]], out: Path) -> Path:
    """Draw each task's two means with 95 % CIs and the paired difference, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 1.4 + 0.9 * len(comparisons)), squeeze=False)
    ax_means, ax_diff = axes[0]
    for i, comp in enumerate(comparisons):
        for offset, side, colour in ((-0.15, "a", "tab:blue"), (0.15, "b", "tab:orange")):
            stats = comp[side]
            lo, hi = stats["ci95"]
            ax_means.errorbar(
                stats["value"],
                i + offset,
                xerr=[[stats["value"] - lo], [hi - stats["value"]]],
                fmt="o",
                color=colour,
                label=stats["model_id"] if i == 0 else None,
                capsize=3,
            )
        diff = comp["difference_b_minus_a"]
        lo, hi = diff["ci95"]
        ax_diff.errorbar(
            diff["value"], i, xerr=[[diff["value"] - lo], [hi - diff["value"]]], fmt="s", color="k", capsize=3
        )
    labels = [c["task"] for c in comparisons]
    for ax in (ax_means, ax_diff):
        ax.set_yticks(range(len(comparisons)), labels)
        ax.grid(axis="x", alpha=0.3)
    ax_means.set_xlabel("mean score (95% CI)")
    ax_means.set_xlim(-0.05, 1.05)
    ax_means.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize="small", frameon=False)
    ax_diff.axvline(0, color="grey", lw=1)
    ax_diff.set_xlabel("paired difference b - a (95% CI)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
