"""The OpenAI-compatible files API through the ``openai`` SDK: upload, list, content, delete, validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from airlock.config import reset_settings
from airlock.errors import InvalidRequestError
from airlock.finetune.files import validate_chat_jsonl
from tests.conftest import HTTP_TIMEOUT, Lab

GOOD = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
]


def jsonl(rows: list[Any]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def client(lab: Lab, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=lab.url + "/v1", api_key=key, max_retries=0)


def ft_key(lab: Lab, evaluator: str = "org-a") -> tuple[str, str]:
    return lab.grant(evaluator, scopes=["sample", "finetune"])


def upload(c: openai.OpenAI, tmp_path: Path, data: bytes, name: str = "train.jsonl") -> Any:
    path = tmp_path / name
    path.write_bytes(data)
    with path.open("rb") as fh:
        return c.files.create(file=fh, purpose="fine-tune")


def stored_files(home: Path) -> list[Path]:
    folder = home / "files"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_upload_list_retrieve_content_delete(lab: Lab, tmp_path: Path, airlock_env: Path) -> None:
    gid, key = ft_key(lab)
    c = client(lab, key)
    data = jsonl(GOOD)
    created = upload(c, tmp_path, data)
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == (
        len(data),
        "train.jsonl",
        "fine-tune",
        "processed",
    )
    assert isinstance(created.created_at, int)
    assert [p.name for p in stored_files(airlock_env)] == [f"{created.id}.jsonl"]  # no temp files left
    second = upload(c, tmp_path, jsonl(GOOD[:1]), "small.jsonl")

    listed = c.files.list()
    assert [f.id for f in listed.data] == [second.id, created.id]
    page = c.files.list(limit=1)
    assert [f.id for f in page.data] == [second.id] and page.has_more
    assert [f.id for f in c.files.list(limit=1, after=second.id).data] == [created.id]
    assert c.files.retrieve(created.id).model_dump() == created.model_dump()
    assert c.files.content(created.id).read() == data

    deleted = c.files.delete(created.id)
    assert deleted.id == created.id and deleted.deleted
    assert [p.name for p in stored_files(airlock_env)] == [f"{second.id}.jsonl"]
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(created.id)
    assert [f.id for f in c.files.list().data] == [second.id]

    paths = [(r.method, r.path, r.status_code, r.outcome, r.grant_id, r.scope) for r in lab.audit_rows()]
    fid = created.id
    for method, path, status in [
        ("POST", "/v1/files", 200),
        ("GET", "/v1/files", 200),
        ("GET", f"/v1/files/{fid}", 200),
        ("GET", f"/v1/files/{fid}/content", 200),
        ("DELETE", f"/v1/files/{fid}", 200),
        ("GET", f"/v1/files/{fid}", 404),
    ]:
        assert any(p[:3] == (method, path, status) and p[4] == gid and p[5] == "finetune" for p in paths), (
            method,
            path,
        )
    upload_row = next(r for r in lab.audit_rows() if r.method == "POST" and r.path == "/v1/files")
    assert upload_row.outcome == "allowed" and upload_row.detail["file_id"] == created.id


def test_other_organisation_sees_nothing(lab: Lab, tmp_path: Path) -> None:
    _g, key_a = ft_key(lab, "org-a")
    _g, key_b = ft_key(lab, "org-b")
    a, b = client(lab, key_a), client(lab, key_b)
    fid = upload(a, tmp_path, jsonl(GOOD)).id
    assert b.files.list().data == []
    for call in (b.files.retrieve, b.files.content, b.files.delete):
        with pytest.raises(openai.NotFoundError) as exc:
            call(fid)
        assert exc.value.code == "file_not_found" and exc.value.status_code == 404
    # A second key of the same organisation (another grant) does see it.
    _g, key_a2 = lab.grant("org-a", scopes=["sample"], variants=["production"])
    assert [f.id for f in client(lab, key_a2).files.list().data] == [fid]
    assert a.files.retrieve(fid).id == fid


def test_upload_needs_finetune_scope(lab: Lab, tmp_path: Path, airlock_env: Path) -> None:
    gid, key = lab.grant(scopes=["sample"])
    with pytest.raises(openai.PermissionDeniedError) as exc:
        upload(client(lab, key), tmp_path, jsonl(GOOD))
    assert "finetune" in str(exc.value)
    assert stored_files(airlock_env) == []
    row = [r for r in lab.audit_rows() if r.path == "/v1/files"][-1]
    assert (row.status_code, row.outcome, row.grant_id, row.error_code) == (403, "denied", gid, "scope_not_granted")


def test_unauthenticated_is_401(lab: Lab) -> None:
    resp = httpx.get(lab.url + "/v1/files", timeout=HTTP_TIMEOUT)
    assert resp.status_code == 401 and resp.json()["error"]["type"] == "authentication_error"


BAD_FILES = [
    (b"", "empty"),
    (b"\n\n", "empty"),
    (jsonl(GOOD)[:-1] + b'\n{"messages": [\n', "line 3: malformed JSON"),
    (jsonl([GOOD[0], {"messages": [{"role": "robot", "content": "x"}]}]), "line 2: messages[0] has role 'robot'"),
    (jsonl([{"messages": [{"role": "user", "content": "only a question"}]}]), "line 1: an example needs"),
    (jsonl([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}]), "line 1"),
    (jsonl([GOOD[0], GOOD[1], [1, 2]]), "line 3: each line must be a JSON object"),
    (jsonl([{"prompt": "a", "completion": "b"}]), "line 1: unsupported key"),
    (jsonl([{"messages": []}]), "line 1: 'messages' must be a non-empty list"),
    (b'{"messages": [{"role": "user", "content": "\xff"}]}', "line 1: not valid UTF-8"),
]


def test_bad_files_are_400_naming_the_line(lab: Lab, tmp_path: Path, airlock_env: Path) -> None:
    _g, key = ft_key(lab)
    c = client(lab, key)
    for data, needle in BAD_FILES:
        with pytest.raises(openai.BadRequestError) as exc:
            upload(c, tmp_path, data)
        assert needle in str(exc.value), (needle, str(exc.value))
        assert exc.value.status_code == 400 and exc.value.code is not None
    assert stored_files(airlock_env) == [] and c.files.list().data == []


def test_wrong_purpose_and_size_limit(
    lab: Lab, tmp_path: Path, airlock_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _g, key = ft_key(lab)
    c = client(lab, key)
    path = tmp_path / "t.jsonl"
    path.write_bytes(jsonl(GOOD))
    with path.open("rb") as fh, pytest.raises(openai.BadRequestError) as exc:
        c.files.create(file=fh, purpose="assistants")
    assert "purpose" in str(exc.value)
    monkeypatch.setenv("AIRLOCK_MAX_FILE_BYTES", "100")
    reset_settings()  # the running app reads the limit from settings on each upload
    with pytest.raises(openai.BadRequestError) as exc:
        upload(c, tmp_path, jsonl(GOOD * 3))
    assert exc.value.code == "file_too_large" and "100 bytes" in str(exc.value)
    assert stored_files(airlock_env) == []


def test_validate_chat_jsonl_token_limit() -> None:
    class Chars:
        def encode(self, text: str) -> list[int]:
            return [ord(ch) for ch in text]

    rows = [{"messages": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "defg"}]}]
    assert validate_chat_jsonl(jsonl(rows), max_tokens_per_example=7, tokenizer=Chars()) == rows
    with pytest.raises(InvalidRequestError, match="line 1: example has 7 tokens, over the limit of 6"):
        validate_chat_jsonl(jsonl(rows), max_tokens_per_example=6, tokenizer=Chars())
    # Without a tokenizer the estimate is ~4 bytes per token.
    with pytest.raises(InvalidRequestError, match="line 2"):
        validate_chat_jsonl(
            jsonl([GOOD[0], {"messages": [{"role": "assistant", "content": "x" * 400}]}]), max_tokens_per_example=50
        )
