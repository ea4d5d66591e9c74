"""The registry's ledger events: models' versions and variants as the public record names them."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from airlock.ledger import service as ledger
from airlock.registry.models import ModelVersion, Variant

__all__ = ["stage_changed", "variant_registered", "version_ref"]


def version_ref(version: ModelVersion) -> dict[str, Any]:
    """Return the public identity of a model version: model name, label and content hash."""
    return {"model": version.model.name, "label": version.label, "hash": version.content_hash}


def variant_registered(session: Session, version: ModelVersion, variant: Variant, *, updated: bool = False) -> None:
    """Log ``variant.registered`` with its mitigations and their stances (configs committed)."""
    mitigations = sorted(variant.mitigations, key=lambda m: m.position)
    body = {
        "version": version_ref(version),
        "variant": variant.name,
        "backend": variant.backend,
        "updated": updated,
        "mitigations": [
            {"position": m.position, "name": m.name, "kind": m.kind, "stance": m.stance} for m in mitigations
        ],
    }
    configs = {f"mitigation.{m.position}.config": m.config for m in mitigations}
    ledger.record_event(session, "variant.registered", body, confidential=configs or None)


def stage_changed(session: Session, version: ModelVersion, from_stage: str | None, to_stage: str, actor: str) -> None:
    """Log ``stage.changed`` (e.g. to ``deployed``, which the verifier's deployment question keys on)."""
    body = {"version": version_ref(version), "from": from_stage, "to": to_stage}
    ledger.record_event(session, "stage.changed", body, confidential={"actor": actor})
