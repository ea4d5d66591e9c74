"""Security regressions of the interp host: patches near the unembedding, patch norms, hidden prefix, depth, budgets."""

from __future__ import annotations

import json
import socket
import struct
import textwrap
import threading
from typing import Any

import numpy as np
import pytest

from airlock.access import service as access
from airlock.config import Settings
from airlock.errors import InvalidRequestError, RateLimitError
from airlock.interp import _wire, tracing
from airlock.interp import service as interp
from airlock.interp.errors import InterpJobError, PatchRefused, RequestError
from airlock.interp.models import InterpJob
from airlock.interp.output_policy import OutputPolicy, apply_policy
from airlock.interp.rpc import RpcServer
from airlock.interp.schemas import InterpJobCreate
from airlock.interp.tracing import HIDDEN_TOKEN, SYSTEM_KEY, run_generate, run_trace
from airlock.interp.workers import ThreadWorker, base_model
from airlock.registry.service import parse_manifest, sync_manifest
from tests.conftest import grant_request, needs_bwrap

HIDDEN = 64


def _trace(worker: ThreadWorker, **request: Any) -> dict[str, Any]:
    reply: dict[str, Any] = worker.submit(lambda m, t: run_trace(m, t, request)).result()
    return reply


def _generate(worker: ThreadWorker, **request: Any) -> dict[str, Any]:
    reply: dict[str, Any] = worker.submit(lambda m, t: run_generate(m, t, request)).result()
    return reply


def _one_hot_attack(scale: float) -> tuple[str, np.ndarray[Any, Any]]:
    """The reviewer's attack: one-hot rows (scaled) as the input of the unembedding."""
    prompt = " ".join(["a"] * (HIDDEN + 5))
    value = np.zeros((1, HIDDEN, HIDDEN), dtype=np.float32)
    for j in range(HIDDEN):
        value[0, j, j] = scale
    return prompt, value


# ---------------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_one_hot_replacement_of_the_final_norm_is_refused(tiny_worker: ThreadWorker, scale: float) -> None:
    prompt, value = _one_hot_attack(scale)
    patch = {"model.norm": {"op": "set", "value": value, "positions": list(range(HIDDEN))}}
    with pytest.raises(PatchRefused, match=r"patching 'model\.norm' is not allowed") as caught:
        _trace(tiny_worker, prompts=[prompt], patch=patch, positions=list(range(HIDDEN)))
    assert caught.value.code == "patch_not_allowed"


@pytest.mark.parametrize("op", ["add", "ablate", "set"])
def test_no_patch_of_any_kind_reaches_the_final_norm(tiny_worker: ThreadWorker, op: str) -> None:
    # add-differencing: logits(x + v) - logits(x) = W_U v; ablation differences leak W_U d the same way.
    vector = np.zeros(HIDDEN, dtype=np.float32)
    vector[3] = 1.0
    with pytest.raises(PatchRefused, match="feeds the unembedding"):
        _trace(tiny_worker, prompts=["hello"], patch={"model.norm": {"op": op, "value": vector}})
    with pytest.raises(PatchRefused, match="feeds the unembedding"):
        _generate(tiny_worker, prompts=["hello"], max_tokens=2, patch={"model.norm": {"op": op, "value": vector}})


def test_patches_are_bounded_by_the_activation_they_edit(tiny_worker: ThreadWorker) -> None:
    base = _trace(tiny_worker, prompts=["the cat sat"], read=["model.layers.0"], logits=False)
    norms = np.linalg.norm(base["activations"]["model.layers.0"][0], axis=-1)
    # A one-hot row at an inner layer may be chosen, but only as large as R x the activation it replaces.
    big = np.zeros(HIDDEN, dtype=np.float32)
    big[0] = float(norms.min()) * 8.5
    for op in ("set", "add"):
        with pytest.raises(PatchRefused, match=r"on 'model.layers.0' is 8\.\d+ times .* at most 8 is allowed"):
            _trace(tiny_worker, prompts=["the cat sat"], patch={"model.layers.0": {"op": op, "value": big}})
    with pytest.raises(PatchRefused) as caught:
        _generate(tiny_worker, prompts=["hi"], max_tokens=2, patch={"model.layers.0": {"op": "add", "value": big * 4}})
    assert caught.value.code == "patch_too_large"
    # A per-position replacement is checked row by row.
    rows = base["activations"]["model.layers.0"].copy()
    rows[0, 1] *= 9.0
    with pytest.raises(PatchRefused, match=r"times the norm"):
        _trace(tiny_worker, prompts=["the cat sat"], patch={"model.layers.0": {"op": "set", "value": rows}})
    # A steering vector well within the bound, and a lower ratio setting refusing it.
    small = big / 8.5 * 0.9
    steered = _trace(tiny_worker, prompts=["the cat sat"], patch={"model.layers.0": {"op": "add", "value": small}})
    assert np.isfinite(steered["top_logits"]["values"]).all()
    request = {"prompts": ["the cat sat"], "patch": {"model.layers.0": {"op": "add", "value": small}}}
    with pytest.raises(PatchRefused, match=r"at most 0\.5 is allowed"):
        tiny_worker.submit(lambda m, t: run_trace(m, t, request, max_patch_ratio=0.5)).result()


def test_ablation_is_not_bounded(tiny_worker: ThreadWorker) -> None:
    direction = np.random.default_rng(1).standard_normal(HIDDEN).astype(np.float32) * 1e6
    reply = _trace(tiny_worker, prompts=["the cat sat"], patch={"model.layers.1": {"op": "ablate", "value": direction}})
    assert np.isfinite(reply["top_logits"]["values"]).all()


@needs_bwrap
def test_a_refused_patch_fails_the_job_even_when_caught(run_code) -> None:
    code = textwrap.dedent(
        """
        import numpy as np
        from airlock.interp import client

        def main():
            value = np.eye(64, dtype=np.float32)[None] * 2.0
            try:
                client.trace(" ".join(["a"] * 70), patch={"model.norm": client.replace(value, list(range(64)))},
                             positions=list(range(64)))
            except client.RemoteError:
                pass
            return {"ok": True}
        """
    )
    outcome = run_code(code)
    assert outcome.error is not None and outcome.error.code == "patch_not_allowed", outcome.logs
    assert "model.norm" in outcome.error.message


# ---------------------------------------------------------------------------------- item 5


def test_patches_never_touch_the_hidden_system_prompt(tiny_worker: ThreadWorker) -> None:
    system = {SYSTEM_KEY: "Be careful and kind."}
    plain = _trace(tiny_worker, prompts=["hello"], chat=True, read=["model.layers.0"], logits=False, **system)
    hidden = plain["tokens"][0].count(HIDDEN_TOKEN)
    assert hidden > 3
    with pytest.raises(RequestError, match="lies in the variant's system prompt, which cannot be patched"):
        _trace(
            tiny_worker,
            prompts=["hello"],
            chat=True,
            patch={"model.layers.0": {"op": "ablate", "value": np.ones(HIDDEN, np.float32), "positions": [0]}},
            **system,
        )

    # A patch without positions edits only the visible positions: the hidden prefix's activations
    # (read on the host, before any later layer) are those of the unpatched run.
    captured: dict[str, Any] = {}

    def run(model: Any, tokenizer: Any) -> None:
        base = base_model(model)
        ids, k = tracing._encode(tokenizer, "hello", True, system[SYSTEM_KEY])
        import torch

        patch = tracing._parse_patches(
            {"model.layers.0": {"op": "ablate", "value": np.ones(HIDDEN, np.float32)}}, base, HIDDEN
        )
        for name, patches in (("plain", {}), ("patched", patch)):
            out: dict[str, torch.Tensor] = {}
            with tracing._hooks(base, ["model.layers.0"], patches, out, [len(ids)], hidden_prefix=[k]):
                base.model(input_ids=torch.tensor([ids]))
            captured[name] = out["model.layers.0"][0].numpy()
        captured["k"] = k

    tiny_worker.submit(run).result()
    k = captured["k"]
    assert k == hidden
    np.testing.assert_array_equal(captured["patched"][:k], captured["plain"][:k])
    assert not np.allclose(captured["patched"][k:], captured["plain"][k:])
    # generate applies position-less patches the same way and still runs.
    texts = _generate(
        tiny_worker,
        prompts=["hello"],
        max_tokens=3,
        patch={"model.layers.0": {"op": "ablate", "value": np.ones(HIDDEN, np.float32)}},
        **system,
    )["texts"]
    assert len(texts) == 1


# ---------------------------------------------------------------------------------- items 2 and 3


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_depth_is_computed_without_recursion() -> None:
    assert _wire.nesting_depth(1) == 0 and _wire.nesting_depth([]) == 0
    assert _wire.nesting_depth({"a": [1, {"b": 2}]}) == 3
    assert _wire.nesting_depth(_deep(100_000)) == 100_000


def test_decode_refuses_headers_nested_past_the_limit() -> None:
    for levels in (_wire.MAX_DEPTH + 1, 500, 100_000):
        body = "[" * levels + "]" * levels
        header = ('{"arrays":[],"body":{"x":' + body + "}}").encode()
        with pytest.raises(_wire.WireError, match="nested deeper than 32"):
            _wire.decode(header, b"")
    ok = _wire.decode(_wire.encode({"x": _deep(_wire.MAX_DEPTH - 1)})[16:], b"")
    assert _wire.nesting_depth(ok) == _wire.MAX_DEPTH


def test_a_deeply_nested_frame_is_refused_cleanly(tiny_worker: ThreadWorker) -> None:
    host_end, runner_end = socket.socketpair()
    server = RpcServer(host_end, tiny_worker, {"ok": True})
    server.start()
    header = ('{"arrays":[],"body":{"op":"job","x":' + "[" * 100_000 + "]" * 100_000 + "}}").encode()
    runner_end.sendall(struct.pack(">QQ", len(header), 0) + header)
    reply, _size = _wire.recv(runner_end, 1 << 20)  # answered, and the stream is still in step
    assert reply["ok"] is False and reply["code"] == "protocol_error" and "nested deeper" in reply["error"]
    runner_end.close()
    server.join(10)
    assert not server._thread.is_alive()
    assert server.protocol_error is not None and "nested deeper" in server.protocol_error
    host_end.close()


def test_args_too_deep_for_the_wire_become_a_clear_job_error(tiny_worker: ThreadWorker) -> None:
    host_end, runner_end = socket.socketpair()
    server = RpcServer(host_end, tiny_worker, {"ok": True, "args": {"x": _deep(40)}})
    errors: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment,misc]
    try:
        server.start()
        _wire.send(runner_end, {"op": "job"})
        server.join(10)
    finally:
        threading.excepthook = previous
    assert errors == [] and not server._thread.is_alive()
    assert server.reply_error is not None and server.reply_error[1] == "invalid_args"
    with pytest.raises(_wire.WireError, match="connection closed"):
        _wire.recv(runner_end, 1 << 20)
    runner_end.close()
    host_end.close()


def test_the_output_policy_refuses_results_nested_past_the_limit() -> None:
    policy = OutputPolicy(max_result_bytes=1 << 20, grant_bytes_left=None, review_over_bytes=1 << 20)
    with pytest.raises(InterpJobError) as caught:
        apply_policy({"x": _deep(200)}, policy, None)
    assert caught.value.code == "invalid_result"
    assert apply_policy({"x": _deep(_wire.MAX_DEPTH - 1)}, policy, None).document


# ---------------------------------------------------------------------------------- service: items 1c, 2, 4

MANIFEST = {
    "models": [
        {"name": "tiny", "versions": [{"label": "v1", "weights": "tiny-random", "variants": [{"name": "open"}]}]}
    ]
}


def _principal(session: Any, evaluator: str, **quotas: Any) -> access.Principal:
    access.create_evaluator(session, evaluator)
    grant = access.create_grant(
        session, grant_request(evaluator=evaluator, model="tiny", variants=["open"], scopes=["interp"], **quotas)
    )
    key, _token = access.create_api_key(session, grant.id)
    return access.Principal(
        key_id=key.id, grant_id=grant.id, evaluator_id=grant.evaluator_id, evaluator_name=evaluator, grant=grant
    )


def test_submit_refuses_deep_args_and_deep_code_with_a_400(db: Any) -> None:
    settings = Settings()
    with db.session() as session:
        sync_manifest(session, parse_manifest(MANIFEST))
        principal = _principal(session, "org-deep")
        code = "def main(**kw):\n    return {}\n"
        with pytest.raises(InvalidRequestError, match="nested deeper than 31 levels") as caught:
            interp.create_job(
                session, settings, principal, InterpJobCreate(model="tiny/open", code=code, args={"x": _deep(31)})
            )
        assert caught.value.status_code == 400
        interp.create_job(
            session, settings, principal, InterpJobCreate(model="tiny/open", code=code, args={"x": _deep(30)})
        )
        deep_code = "x = " + "(" * 5000 + "1" + ")" * 5000 + "\n"
        deep_code2 = "x = " + "-" * 100_000 + "1\n"
        for text in (deep_code, deep_code2):
            with pytest.raises(InvalidRequestError, match="does not compile") as caught:
                interp.create_job(session, settings, principal, InterpJobCreate(model="tiny/open", code=text))
            assert caught.value.status_code == 400


def test_a_grant_without_a_result_quota_gets_the_default_budget(db: Any) -> None:
    settings = Settings()
    assert settings.interp_default_grant_result_bytes == 32 * 1024 * 1024 < 49152 * 576 * 2
    with db.session() as session:
        sync_manifest(session, parse_manifest(MANIFEST))
        principal = _principal(session, "org-budget")
        own = _principal(session, "org-own", quota_result_bytes=10**12)
        assert interp.grant_result_bytes(principal.grant, settings) == settings.interp_default_grant_result_bytes
        assert interp.grant_result_bytes(own.grant, settings) == 10**12
        code = "def main():\n    return {}\n"
        for who in (principal, own):
            job = interp.create_job(session, settings, who, InterpJobCreate(model="tiny/open", code=code))
            row = session.get(InterpJob, job.id)
            row.result_bytes = settings.interp_default_grant_result_bytes
        session.flush()
        with pytest.raises(RateLimitError, match="default budget") as caught:
            interp.create_job(session, settings, principal, InterpJobCreate(model="tiny/open", code=code))
        assert caught.value.code == "insufficient_quota"
        interp.create_job(session, settings, own, InterpJobCreate(model="tiny/open", code=code))
    assert json.dumps(settings.interp_max_patch_norm_ratio) == "8.0"
