"""The model-id grammar: one parser for every id a client sends, each malformed form a clear 400."""

from __future__ import annotations

import pytest

from airlock.errors import InvalidRequestError
from airlock.ids import (
    FineTunedRef,
    ModelRef,
    VersionRef,
    fine_tuned_model_id,
    is_fine_tuned,
    parse_fine_tuned_id,
    parse_model_id,
    parse_version_ref,
)


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("m/production", ModelRef("m", None, "production")),
        ("m@v1/helpful-only", ModelRef("m", "v1", "helpful-only")),
        ("smollm2-135m@3f9c0a12/base", ModelRef("smollm2-135m", "3f9c0a12", "base")),
    ],
)
def test_model_ids_round_trip(text: str, ref: ModelRef) -> None:
    assert parse_model_id(text) == ref and str(ref) == text


@pytest.mark.parametrize("text", ["m", "/v", "m/", "m@/v", "@v1/p", "a/b/c", "m@v@w/p", "m v/p", "m:x/p", "ft:m/p"])
def test_malformed_model_ids_are_400(text: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_model_id(text)
    assert info.value.status_code == 400 and info.value.code == "invalid_model" and info.value.param == "model"


def test_version_refs() -> None:
    assert parse_version_ref("m") == VersionRef("m", None) and str(parse_version_ref("m@v1")) == "m@v1"
    for bad in ("", "m@", "@v", "m@v@w", "m/x"):
        with pytest.raises(InvalidRequestError):
            parse_version_ref(bad)
    with pytest.raises(InvalidRequestError, match="'\\{model\\}@\\{version\\}'"):
        parse_version_ref("m", require_version=True)


def test_fine_tuned_ids_and_their_checkpoints() -> None:
    model_id = fine_tuned_model_id("m@v1/helpful-only", "Org A", "zebra", "ftjob_0123")
    assert model_id == "ft:m@v1/helpful-only:org-a:zebra:ftjob_0123" and is_fine_tuned(model_id)
    ref = parse_fine_tuned_id(model_id)
    assert ref == FineTunedRef(ModelRef("m", "v1", "helpful-only"), "org-a", "zebra", "ftjob_0123")
    assert str(ref) == ref.model_id == model_id
    checkpoint = parse_fine_tuned_id(model_id + ":ckpt-step-10")
    assert checkpoint.checkpoint_step == 10 and checkpoint.model_id == model_id and str(checkpoint).endswith("-10")
    assert parse_fine_tuned_id("ft:m/p:org::ftjob_1").suffix == ""


@pytest.mark.parametrize(
    "text",
    ["ft:m/p", "ft:m/p:o:s", "ft:m/p:o:s:", "ft:m/p:o:s:j:ckpt-step-x", "ft:m/p:o:s:j:x", "ft:m:o:s:j", "m/p:o:s:j"],
)
def test_malformed_fine_tuned_ids_are_400(text: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_fine_tuned_id(text)
    assert info.value.code == "invalid_model"
