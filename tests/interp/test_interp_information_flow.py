"""What interp lets out: logits bounded by design, costs estimated and refused up front, results hashed whole."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from airlock.interp import _wire, client, tracing
from airlock.interp.errors import InterpJobError, RequestError
from airlock.interp.output_policy import OutputPolicy, Released, apply_policy
from airlock.interp.tracing import (
    DEFAULT_MAX_HOST_BYTES,
    SYSTEM_KEY,
    Estimate,
    MiB,
    ServeBudget,
    estimate_generate,
    plan_trace,
    run_generate,
    run_trace,
    served_payload,
)
from airlock.interp.workers import ThreadWorker, model_size_of
from tests.conftest import HTTP_TIMEOUT, grant_request, needs_bwrap

HIDDEN = 64
VOCAB = 49152


def _trace(worker: ThreadWorker, budget: ServeBudget | None = None, **request: Any) -> dict[str, Any]:
    reply: dict[str, Any] = worker.submit(lambda m, t: run_trace(m, t, request, budget=budget)).result()
    return reply


def _plan(worker: ThreadWorker, budget: ServeBudget | None = None, **request: Any) -> Any:
    return worker.submit(lambda m, t: plan_trace(m, t, request, budget=budget)).result()


@pytest.fixture
def forward_calls(tiny_worker: ThreadWorker) -> Iterator[list[int]]:
    """Count the forward passes of the tiny model's first decoder layer while the test runs."""
    calls: list[int] = []

    def install(model: Any, _tokenizer: Any) -> Any:
        return model.model.layers[0].register_forward_hook(lambda *_args: calls.append(1))

    handle = tiny_worker.submit(install).result()
    yield calls
    handle.remove()


# ---------------------------------------------------------------------------------- refused up front


def test_oversized_requests_are_refused_before_the_model_runs(
    tiny_worker: ThreadWorker, forward_calls: list[int]
) -> None:
    long_prompts = ["word " * 1000] * 8
    full = ServeBudget(full_logits=True)
    # Full logits over every position: 8 x 1001 x 49152 float32 is 1.5 GiB, past the reply cap.
    with pytest.raises(RequestError, match=r"this trace would reply with up to \d+ bytes; the cap is 268435456"):
        _trace(tiny_worker, full, prompts=long_prompts, logits="full")
    with pytest.raises(RequestError, match=r"would need about \d+ MiB of host memory; the cap is 64 MiB"):
        _trace(tiny_worker, ServeBudget(max_host_bytes=64 * MiB), prompts=long_prompts)
    budget = ServeBudget(served_left=1000, served_budget=5000)
    with pytest.raises(RequestError, match=r"only 1000 of 5000 bytes of the grant's interp serving budget"):
        _trace(tiny_worker, budget, prompts=["hello world"] * 4, read=["model.layers.0"])
    with pytest.raises(RequestError, match=r"this generate would reply with up to \d+ bytes; the cap is 4096"):
        tiny_worker.submit(
            lambda m, t: run_generate(
                m, t, {"prompts": ["hi"] * 64, "max_tokens": 256}, budget=ServeBudget(max_reply_bytes=4096)
            )
        ).result()
    assert forward_calls == [] and budget.served == 0


def test_the_default_trace_of_long_prompts_is_served_cheaply(
    tiny_worker: ThreadWorker, forward_calls: list[int]
) -> None:
    # The defaults (all positions, logits on) no longer mean the whole vocabulary at every position.
    long_prompts = ["word " * 1000] * 8
    plan = _plan(tiny_worker, prompts=long_prompts)
    assert plan.estimate.reply_bytes < 1024 * 1024
    assert plan.estimate.host_bytes <= DEFAULT_MAX_HOST_BYTES
    budget = ServeBudget()
    reply = _trace(tiny_worker, budget, prompts=long_prompts)
    assert "logits" not in reply and reply["top_logits"]["ids"].shape == (8, 1001, 5)
    assert len(_wire.encode({"ok": True, **reply})) <= plan.estimate.reply_bytes
    assert budget.served == served_payload(reply) <= plan.estimate.served_bytes
    assert forward_calls


SYSTEM = {SYSTEM_KEY: "Be careful and kind."}
REQUESTS: list[dict[str, Any]] = [
    {"prompts": ["hello there world", "a"], "read": ["model.layers.0", "model.norm"], "positions": [-1, 0]},
    {"prompts": ["the cat sat on the mat", "x y"], "lens": ["model.layers.0", "model.norm"], "top_k": 7},
    {"prompts": ['é😀 ünïcödé \n\t"quotes"', "a"], "token_ids": list(range(0, 49152, 193)), "top_k": 64},
    {"prompts": ["hello", "hi there"], "chat": True, "read": ["model.layers.1.mlp"], **SYSTEM},
    {"prompts": ["one two three"], "logits": False, "read": ["model.layers.1"], "positions": [-1]},
    {"prompts": ["short", "a much longer prompt than the first"], "logits": "full", "lens": ["model.layers.1"]},
]


@pytest.mark.parametrize("request_", REQUESTS)
def test_the_estimate_bounds_the_real_reply(tiny_worker: ThreadWorker, request_: dict[str, Any]) -> None:
    budget = ServeBudget(full_logits=True)
    plan = _plan(tiny_worker, budget, **request_)
    reply = _trace(tiny_worker, budget, **request_)
    size = len(_wire.encode({"ok": True, **reply}))
    assert size <= plan.estimate.reply_bytes <= 2 * size + 64 * 1024, (size, plan.estimate)
    assert budget.served == served_payload(reply) <= plan.estimate.served_bytes


def test_the_generate_estimate_bounds_the_real_reply(tiny_worker: ThreadWorker) -> None:
    request = {"prompts": ["hello", "é😀 tell me more"], "max_tokens": 24, "temperature": 1.0, "seed": 5}
    budget = ServeBudget()
    reply = tiny_worker.submit(lambda m, t: run_generate(m, t, request, budget=budget)).result()

    def estimate(model: Any, tokenizer: Any) -> Estimate:
        _texts, longest_json, longest_utf8 = tracing._token_texts(tokenizer)
        lengths = [len(tracing._encode(tokenizer, p, True)[0]) for p in request["prompts"]]
        return estimate_generate(tracing._dims(model), lengths, 24, longest_json, longest_utf8)

    bound = tiny_worker.submit(estimate).result()
    assert all(reply["texts"])
    assert len(_wire.encode({"ok": True, **reply})) <= bound.reply_bytes
    assert budget.served == served_payload(reply) <= bound.served_bytes


def test_micro_batches_give_the_results_of_one_batch(tiny_worker: ThreadWorker) -> None:
    prompts = [" ".join(["word"] * (40 + 30 * i)) for i in range(5)]
    replacement = np.random.default_rng(0).standard_normal((5, 1, HIDDEN)).astype(np.float32) * 0.1
    request = {
        "prompts": prompts,
        "read": ["model.layers.1"],
        "positions": [-1, 3],
        "token_ids": [11, 12],
        "lens": ["model.layers.0"],
        "patch": {"model.layers.0": {"op": "add", "value": replacement[0, 0], "positions": [2]}},
    }
    whole = _plan(tiny_worker, **request)
    assert whole.estimate.batches == ((0, 5),)

    def forward(batch: int, width: int) -> int:
        return tiny_worker.submit(lambda m, t: tracing._forward_bytes(tracing._dims(m), batch, width)).result()

    # A cap that fits two of the longest prompts' forward pass, not all five.
    longest = max(len(ids) for ids in whole.encoded)
    cap = whole.estimate.host_bytes - forward(5, longest) + forward(2, longest)
    budget = ServeBudget(max_host_bytes=cap)
    split = _plan(tiny_worker, budget, **request)
    assert len(split.estimate.batches) >= 2 and split.estimate.host_bytes <= cap
    one, many = _trace(tiny_worker, **request), _trace(tiny_worker, budget, **request)
    np.testing.assert_allclose(
        many["activations"]["model.layers.1"], one["activations"]["model.layers.1"], rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(many["token_logits"]["values"], one["token_logits"]["values"], rtol=1e-4, atol=1e-4)
    assert (many["lens"]["model.layers.0"]["token_ids"] == one["lens"]["model.layers.0"]["token_ids"]).all()
    # A per-prompt replacement is cut to each micro-batch.
    per_prompt = dict(request, patch={"model.layers.0": {"op": "set", "value": replacement, "positions": [-1]}})
    np.testing.assert_allclose(
        _trace(tiny_worker, budget, **per_prompt)["activations"]["model.layers.1"],
        _trace(tiny_worker, **per_prompt)["activations"]["model.layers.1"],
        rtol=1e-4,
        atol=1e-4,
    )


# ---------------------------------------------------------------------------------- result digest


def _released(value: Any) -> Released:
    return apply_policy(value, OutputPolicy(1 << 20, None, 1 << 20), None)


def _npz(released: Released) -> dict[str, np.ndarray[Any, Any]]:
    with np.load(io.BytesIO(released.npz)) as data:
        return {name: data[name] for name in data.files}


def test_result_sha256_covers_the_json_values_and_the_arrays() -> None:
    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}
    first = _released({"accuracy": 0.91, **arrays})
    second = _released({"accuracy": 0.12, **arrays})
    assert first.npz == second.npz and first.sha256 != second.sha256
    # Results without arrays are told apart too (they used to share the empty NPZ's hash).
    assert _released({"a": 1}).sha256 != _released({"a": 2}).sha256 != _released({}).sha256
    # The same values in another key order are the same result; another dtype or value is not.
    assert _released({"b": [1, 2], "a": "x"}).sha256 == _released({"a": "x", "b": [1, 2]}).sha256
    assert _released({"x": arrays["x"].astype(np.float64)}).sha256 != _released(arrays).sha256
    changed = arrays["x"].copy()
    changed[2, 3] += 1
    assert _released({"x": changed}).sha256 != _released(arrays).sha256
    # The evaluator recomputes it from what the API returns: the JSON value and the NPZ.
    for released in (first, second, _released({"nested": [{"y": np.ones(3, np.int8)}, float("nan")]})):
        assert client.result_sha256(released.document, _npz(released)) == released.sha256
    for unrepresentable in ({"text": "\ud800"}, {"count": 2**60}):
        with pytest.raises(InterpJobError, match="not exactly representable as JSON") as caught:
            _released(unrepresentable)
        assert caught.value.code == "invalid_result"
    with pytest.raises(InterpJobError, match="'__array__' is reserved"):
        _released({"fake": {"__array__": "a0"}})


# ---------------------------------------------------------------------------------- the extraction, tried

# The evaluator's code of the extraction: read the final norm's output and logits over many
# positions, fit the (tied) embedding rows by least squares inside the sandbox, return them.
EXTRACT = """
import numpy as np
from airlock.interp import client

def main(start, rows, prompts, full=False, int8=False):
    ids = list(range(start, start + rows))
    states, logits = [], []
    for i in range(0, len(prompts), 8):
        t = client.trace(prompts[i : i + 8], read=["model.norm"], logits="full" if full else True,
                         token_ids=[] if full else ids, top_k=1)
        for b, pos in enumerate(t.positions):
            n = len(pos)
            states.append(t.activations["model.norm"][b, :n])
            logits.append(t.logits[b, :n][:, ids] if full else t.token_logits[b, :n])
    h, y = np.concatenate(states).astype(np.float64), np.concatenate(logits).astype(np.float64)
    rows_fit = np.linalg.lstsq(h, y, rcond=None)[0].T
    if int8:
        scale = np.abs(rows_fit).max(axis=1, keepdims=True) / 127
        return {"ids": ids, "rows": np.round(rows_fit / scale).astype(np.int8), "scale": scale.astype(np.float32)}
    return {"ids": ids, "rows": rows_fit.astype(np.float32)}
"""

# The cheapest route known: the first decoder layer's input norm is each token's embedding row,
# normalised; one read per token gives that row's direction, no fitting needed.
LAYER0 = """
from airlock.interp import client

def main(prompts):
    t = client.trace(prompts, read=["model.layers.0.input_layernorm"], logits=False)
    rows, tokens = [], []
    for b, pos in enumerate(t.positions):
        for j, p in enumerate(pos):
            tokens.append(t.tokens[b][p])
            rows.append(t.activations["model.layers.0.input_layernorm"][b, j])
    return {"tokens": tokens, "rows": rows}
"""

TINY = {
    "models": [{"name": "tiny", "versions": [{"label": "v1", "weights": "tiny-random", "variants": [{"name": "x"}]}]}]
}
ONE_PERCENT = VOCAB // 100  # 491 rows of the 49,152 x 64 embedding


def _attack_prompts(seed: int, count: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "river", "stone", "quiet", "orbit", "maple", "ember", "lunar", "cedar", "prism", "delta"]
    return [" ".join(rng.choice(words, size=14)) for _ in range(count)]


class _Lab:
    """A database, one grant and the interp job handler over one model: submit, run, read back."""

    def __init__(
        self, db: Any, worker: ThreadWorker, evaluator: str, manifest: dict[str, Any] = TINY, **terms: Any
    ) -> None:
        from airlock.access import service as access
        from airlock.config import get_settings
        from airlock.interp.jobs import KIND, InterpHandler
        from airlock.jobs.runner import JobRunner
        from airlock.registry.service import parse_manifest, sync_manifest

        self.db, self.settings = db, get_settings()
        self.model = str(manifest["models"][0]["name"])
        with db.session() as session:
            sync_manifest(session, parse_manifest(manifest))
            access.create_evaluator(session, evaluator)
            grant = access.create_grant(
                session,
                grant_request(evaluator=evaluator, model=self.model, variants=["x"], scopes=["interp"], **terms),
            )
            key, _token = access.create_api_key(session, grant.id)
            self.principal = access.Principal(
                key_id=key.id, grant_id=grant.id, evaluator_id=grant.evaluator_id, evaluator_name=evaluator, grant=grant
            )
        self.runner = JobRunner(db, {KIND: InterpHandler(db, self.settings, lambda spec: worker)})

    def run(self, code: str, **args: Any) -> dict[str, Any]:
        """Submit and run one job; return its public view, and its released value and arrays (if any)."""
        from airlock.interp import service as interp
        from airlock.interp.models import InterpJob
        from airlock.interp.schemas import InterpJobCreate
        from airlock.jobs.models import Job

        with self.db.session() as session:
            job_id = interp.create_job(
                session, self.settings, self.principal, InterpJobCreate(model=f"{self.model}/x", code=code, args=args)
            ).id
        assert self.runner.run_once()
        with self.db.session() as session:
            job, row = session.get(Job, job_id), session.get(InterpJob, job_id)
            assert job is not None and row is not None
            view = interp.to_public(job, row).model_dump()
            if view["status"] == "succeeded":
                result = interp.released_result(self.settings.home_dir, job, row)
                with np.load(interp.released_npz(self.settings.home_dir, job, row)) as data:
                    arrays = {name: data[name] for name in data.files}
                view["value"], view["arrays"] = result.value, arrays
                assert client.result_sha256(result.value, arrays) == result.result_sha256
        return view


def _rows(view: dict[str, Any]) -> np.ndarray[Any, Any]:
    value, arrays = view["value"], view["arrays"]
    rows = arrays[value["rows"]["__array__"]].astype(np.float64)
    if "scale" in value:
        rows = rows * arrays[value["scale"]["__array__"]]
    return rows


def _extract(
    lab: _Lab, embedding: np.ndarray[Any, Any], *, full: bool, jobs: int, rows: int, prompts_per_job: int = 12
) -> tuple[int, list[dict[str, Any]]]:
    """Run the extraction job after job; return the rows released without review, and every job's view."""
    released, views = 0, []
    for n in range(jobs):
        prompts = _attack_prompts(n, count=prompts_per_job)
        args = {"start": n * rows, "rows": rows, "prompts": prompts, "full": full, "int8": n % 2 == 1}
        view = lab.run(EXTRACT, **args)
        views.append(view)
        if view["status"] != "succeeded":
            break
        ids = view["value"]["ids"]
        # The attack works: the rows that left are the embedding's (int8 ones to about 1 %).
        error = np.abs(_rows(view) - embedding[ids]).max() / np.abs(embedding[ids]).max()
        assert error < 0.02, error
        released += len(ids)
    return released, views


@needs_bwrap
def test_the_extraction_is_held_for_review_before_one_percent_of_the_embedding_leaves(
    db: Any, tiny_worker: ThreadWorker
) -> None:
    embedding = tiny_worker.model.model.embed_tokens.weight.detach().numpy().astype(np.float64)
    size = model_size_of(tiny_worker.model)
    assert size.embedding_parameters == VOCAB * HIDDEN

    # With the default terms: logits for requested token ids only, and review past the threshold.
    lab = _Lab(db, tiny_worker, "org-default")
    released, views = _extract(lab, embedding, full=False, jobs=4, rows=32)
    assert released < ONE_PERCENT and views[-1]["status"] == "awaiting_review", views[-1]
    assert "past its review threshold" in views[-1]["review"]["reasons"][-1]
    assert views[-1]["logs"].startswith("(withheld")

    # A grant that allows full logits is refused them up front: the whole vocabulary over the
    # positions a fit needs is more than the default serving budget.
    full = _Lab(db, tiny_worker, "org-full", interp_full_logits=True)
    released, views = _extract(full, embedding, full=True, jobs=2, rows=256)
    assert released == 0 and views[-1]["status"] == "failed", views[-1]
    assert views[-1]["error"]["code"] == "rpc_refused"
    assert "of the grant's interp serving budget are left" in views[-1]["error"]["message"]

    # The cheapest route (one read of the first layer's input norm per token) is held as well.
    cheap = _Lab(db, tiny_worker, "org-layer0")
    tokens: set[str] = set()
    for n in range(20):
        view = cheap.run(LAYER0, prompts=[f"token{n}x{i} " * 2 for i in range(3)])
        if view["status"] != "succeeded":
            break
        tokens.update(view["value"]["tokens"])
    assert len(tokens) < ONE_PERCENT and view["status"] == "awaiting_review", view

    # Control: the same extraction on a grant whose lab raised both terms far past the defaults
    # releases more than 1 % of the rows with no review, so the limits above are what held it.
    open_lab = _Lab(db, tiny_worker, "org-open", quota_interp_served_bytes=10**12, interp_review_served_bytes=10**12)
    released, views = _extract(open_lab, embedding, full=False, jobs=2, rows=256)
    assert released >= ONE_PERCENT and all(v["review"]["state"] == "none" for v in views)


SMOLLM2 = {
    "models": [
        {
            "name": "smol",
            "versions": [{"label": "v1", "weights": "embedded:smollm2-135m", "variants": [{"name": "x"}]}],
        }
    ]
}


@pytest.mark.slow
@needs_bwrap
def test_the_extraction_on_smollm2_is_held_or_refused_under_the_default_terms(
    db: Any, smollm2_worker: ThreadWorker
) -> None:
    import json

    from airlock.config import get_settings
    from airlock.interp import service as interp
    from airlock.interp.models import InterpJob

    size = model_size_of(smollm2_worker.model)
    limits = interp.served_limits(None, get_settings(), size.parameter_bytes, size.embedding_parameters)
    # 0.1 % of 538 MB of float32 parameters: half a megabyte, 1/27 of the embedding at 4 bits.
    assert limits.review_bytes < size.embedding_parameters // 2 // 20
    embedding = smollm2_worker.model.model.embed_tokens.weight.detach().numpy().astype(np.float64)

    # The finding's trace: the final norm and logits over about 1,000 positions (here the 256
    # requested ids a call allows); the fit succeeds inside the sandbox, and the result is held.
    lab = _Lab(db, smollm2_worker, "org-smol", manifest=SMOLLM2)
    released, views = _extract(lab, embedding, full=False, jobs=2, rows=256, prompts_per_job=48)
    assert released == 0 and views[-1]["status"] == "awaiting_review", views[-1]
    with db.session() as session:
        row = session.get(InterpJob, views[-1]["id"])
        assert row is not None and row.served_bytes > limits.review_bytes
    # The lab's reviewer sees what would have left: the fitted rows are the embedding's.
    stored = interp.job_dir(lab.settings.home_dir, views[-1]["id"])
    value = json.loads((stored / "result.json").read_text())
    with np.load(stored / "result.npz") as data:
        held = data[value["rows"]["__array__"]].astype(np.float64)
    ids = value["ids"]
    assert np.abs(held - embedding[ids]).max() / np.abs(embedding[ids]).max() < 1e-3

    # With full logits granted, the call is refused before the model runs: its whole-vocabulary
    # logits are far over the serving budget.
    full = _Lab(db, smollm2_worker, "org-smol-full", manifest=SMOLLM2, interp_full_logits=True)
    released, views = _extract(full, embedding, full=True, jobs=1, rows=256, prompts_per_job=48)
    assert released == 0 and views[-1]["error"]["code"] == "rpc_refused", views[-1]


# ---------------------------------------------------------------------------------- grant terms


def test_interp_terms_are_set_at_grant_creation_and_listed(lab: Any) -> None:
    import httpx

    with httpx.Client(
        base_url=lab.url + "/v1/airlock/admin",
        headers={"Authorization": f"Bearer {lab.admin_token}"},
        timeout=HTTP_TIMEOUT,
    ) as admin:
        admin.post("/evaluators", json={"name": "org-terms"})
        body = {"evaluator": "org-terms", "model": "m1", "variants": ["base"], "scopes": ["interp"]}
        plain = admin.post("/grants", json=body)
        assert plain.status_code == 201, plain.text
        assert plain.json()["interp_full_logits"] is False and plain.json()["quota_interp_served_bytes"] is None
        terms = {"interp_full_logits": True, "quota_interp_served_bytes": 5_000_000, "interp_review_served_bytes": 1000}
        created = admin.post("/grants", json=body | terms)
        assert created.status_code == 201, created.text
        listed = {g["id"]: g for g in admin.get("/grants").json()}[created.json()["id"]]
        assert {key: listed[key] for key in terms} == terms
        refused = admin.post("/grants", json=body | {"quota_interp_served_bytes": 0})
        assert refused.status_code == 400 and refused.json()["error"]["message"]


def test_interp_terms_through_the_cli(airlock_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import yaml
    from typer.testing import CliRunner

    from airlock import cli_support
    from airlock.cli import app
    from tests.conftest import FAKE_MANIFEST

    runner = CliRunner()
    monkeypatch.setattr(cli_support.console, "_width", 240)  # the table, unwrapped

    def invoke(*args: str) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    invoke("init", "--no-admin-token")
    (airlock_env / "airlock.yaml").write_text(yaml.safe_dump(FAKE_MANIFEST))
    invoke("models", "sync")
    invoke("evaluator", "add", "org-cli")
    base = ["grant", "create", "--evaluator", "org-cli", "--model", "m1", "--variants", "base", "--scopes", "interp"]
    full = invoke(*base, "--interp-full-logits", "--interp-served-bytes", "4000000").strip()
    plain = invoke(*base).strip()
    listing = {g["id"]: g for g in json.loads(invoke("grant", "list", "--json"))}
    assert listing[full]["interp_full_logits"] is True and listing[full]["quota_interp_served_bytes"] == 4_000_000
    assert listing[plain]["interp_full_logits"] is False
    table = invoke("grant", "list")
    assert "interp (interp: full logits)" in table and table.count("full logits") == 1
