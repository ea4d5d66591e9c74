"""The tournament watermark: keyed g-values, the exact tilt, distortion-freeness over keys, and the detector."""

from __future__ import annotations

import pytest
import torch

from airlock.backends import watermark
from airlock.backends.watermark import CONTEXT, LAYERS, WatermarkStream, detect, g_values, token_g_value, tournament

VOCAB = 256


def toy_distribution(window: tuple[int, ...], vocab: int = VOCAB) -> torch.Tensor:
    """A fixed, context-dependent next-token distribution (a stand-in language model)."""
    gen = torch.Generator().manual_seed(hash(window) % (1 << 31))
    return torch.softmax(torch.randn(vocab, generator=gen) * 1.5, dim=-1)


def generate(key: bytes | None, length: int, seed: int, support: list[int] | None = None) -> list[int]:
    """Sample ``length`` tokens from the toy model (over ``support``), watermarked under ``key`` (plain without one)."""
    gen = torch.Generator().manual_seed(seed)
    ids = [1, 2, 3, 4] if support is None else support[:4]
    stream = WatermarkStream.start(key) if key is not None else None
    for _ in range(length):
        probs = toy_distribution(tuple(ids[-CONTEXT:]))
        if support is not None:  # the toy model's mass on these token ids of a real vocabulary
            probs = torch.zeros(max(support) + 1).index_add_(0, torch.tensor(support[: len(probs)]), probs)
        if stream is not None:
            probs = stream.tilt(probs)
        token = int(torch.multinomial(probs, 1, generator=gen)[0])
        ids.append(token)
        if stream is not None:
            stream.advance(token)
    return ids


def test_one_token_g_value_equals_the_vocabulary_stream() -> None:
    key = bytes(range(32))
    stream = g_values(key, (5, 6, 7, 8), 1000)
    assert [token_g_value(key, (5, 6, 7, 8), t) for t in (0, 1, 63, 64, 65, 640, 999)] == [
        int(stream[t]) for t in (0, 1, 63, 64, 65, 640, 999)
    ]
    assert not (g_values(key, (5, 6, 7, 9), 1000) == stream).all()  # another window, other g-values
    assert not (g_values(bytes(32), (5, 6, 7, 8), 1000) == stream).all()  # another key, other g-values


def test_tournament_matches_a_brute_force_tournament() -> None:
    # Three tokens, hand-checkable: the exact winner distribution of layer-by-layer matches.
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    patterns = torch.tensor([0b00000001, 0b00000010, 0b00000011], dtype=torch.uint8)
    q = probs.clone()
    for layer in range(LAYERS):
        g = torch.tensor([(int(p) >> layer) & 1 for p in patterns], dtype=torch.float64)
        # P(x wins) = q(x) * (2 P(g(y) < g(x)) + P(g(y) = g(x))) for two independent candidates.
        below = torch.tensor([float((q * (g < g[x])).sum()) for x in range(3)], dtype=torch.float64)
        same = torch.tensor([float((q * (g == g[x])).sum()) for x in range(3)], dtype=torch.float64)
        q = q * (2 * below + same)
    assert torch.allclose(tournament(probs, patterns), q)
    assert abs(float(q.sum()) - 1) < 1e-12


def test_distortion_free_over_keys() -> None:
    probs = toy_distribution((9, 9, 9, 9), 16).to(torch.float64)
    trials = 3000
    mean = torch.zeros(16, dtype=torch.float64)
    for i in range(trials):
        key = i.to_bytes(32, "little")
        mean += tournament(probs, torch.from_numpy(g_values(key, (1, 2, 3, 4), 16).copy()))
    mean /= trials
    # Each key's tilt multiplies p(x) by at most 2**LAYERS; the average over keys is p itself.
    assert (mean - probs).abs().max() < 0.02, (mean - probs).abs().max()
    assert (mean - probs).abs().max() < 0.25 * probs.max()


def test_watermarked_text_is_detected_with_its_key_only() -> None:
    key, other = b"k" * 32, b"o" * 32
    marked = generate(key, 200, seed=1)
    found = detect(key, marked)
    assert found.p_value < 1e-4 and found.mean_g > 0.55
    assert found.scored_tokens <= 200
    assert detect(other, marked).p_value > 1e-3
    assert detect(key, generate(None, 200, seed=1)).p_value > 1e-3


def test_null_p_values_are_not_small() -> None:
    # Unwatermarked text: the p-values of 40 keys spread over (0, 1], none extreme.
    plain = generate(None, 200, seed=2)
    p_values = [detect(i.to_bytes(32, "little"), plain).p_value for i in range(40)]
    assert min(p_values) > 1e-4
    assert 0.2 < sorted(p_values)[20] < 0.8  # median near 1/2


def test_repeated_windows_are_sampled_plainly_and_scored_once() -> None:
    stream = WatermarkStream.start(b"k" * 32)
    probs = toy_distribution((1, 2, 3, 4))
    for token in (1, 2, 3):
        assert torch.equal(stream.tilt(probs), probs)  # the first generated tokens: no full window yet
        stream.advance(token)
    stream.advance(4)
    assert not torch.equal(stream.tilt(probs), probs)
    assert torch.equal(stream.tilt(probs), probs)  # the same window again: untouched
    ids = [1, 2, 3, 4, 5] * 3
    assert [w for w, _t in watermark.scored_positions(ids)] == [
        (1, 2, 3, 4),
        (2, 3, 4, 5),
        (3, 4, 5, 1),
        (4, 5, 1, 2),
        (5, 1, 2, 3),
    ]
    assert detect(b"k" * 32, ids).scored_tokens == 5
    assert detect(b"k" * 32, [1, 2, 3]).p_value == 1.0


def chi_square_p(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Return the chi-square goodness-of-fit p-value of ``counts`` against ``expected_probs``."""
    from scipy.stats import chisquare

    probs = expected_probs.to(torch.float64)
    expected = probs / probs.sum() * counts.sum()
    return float(chisquare(counts.to(torch.float64).numpy(), expected.numpy()).pvalue)


def test_the_batched_tournament_draws_from_the_exact_tournament_distribution() -> None:
    # Fixed g-value bytes and a fixed distribution: the left-on-tie tournament of independent
    # candidates has the exact winner distribution `tournament` computes (random tie-breaks).
    vocab, rows = 8, 6000
    probs = toy_distribution((7, 7, 7, 7), vocab).to(torch.float64)
    table = torch.tensor([3, 200, 17, 96, 255, 0, 129, 66], dtype=torch.uint8)
    gen = torch.Generator().manual_seed(3)
    candidates = torch.stack([watermark.draw_candidates(probs, gen) for _ in range(rows)])
    winners = watermark.tournament_winners(candidates, table[candidates])
    counts = torch.bincount(winners, minlength=vocab)
    exact = tournament(probs, table)
    assert chi_square_p(counts, exact) > 1e-3
    assert chi_square_p(counts, probs) < 1e-6  # one key and window: a strong tilt, as it must be


def biased_tournament(candidates: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """A subtly wrong tournament: a tie goes to the higher token id (not exchangeable, hence biased)."""
    ids, bytes_ = candidates, patterns.to(torch.int32)
    for layer in range(LAYERS):
        bits = (bytes_ >> layer) & 1
        left, right = bits[:, 0::2], bits[:, 1::2]
        take = (right > left) | ((right == left) & (ids[:, 1::2] > ids[:, 0::2]))
        ids = torch.where(take, ids[:, 1::2], ids[:, 0::2])
        bytes_ = torch.where(take, bytes_[:, 1::2], bytes_[:, 0::2])
    return ids[:, 0]


def test_watermarked_sampling_matches_the_model_distribution_by_chi_square(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each token under a fresh window (as in text, where windows keep changing): the empirical
    # distribution of watermarked sampling is the model's. Fixed seed, so the test is deterministic.
    vocab, rows = 16, 8000
    probs = toy_distribution((5, 5, 5, 5), vocab)
    key = b"w" * 32
    gen = torch.Generator().manual_seed(11)
    candidates = torch.stack([watermark.draw_candidates(probs, gen) for _ in range(rows)])
    windows = [(key, (i, i + 1, i + 2, i + 3)) for i in range(rows)]
    counts = torch.bincount(watermark.sample_batch(candidates, windows, vocab), minlength=vocab)
    assert chi_square_p(counts, probs) > 1e-3
    # The same test catches a biased sampler: the same candidates under ties broken by token id...
    monkeypatch.setattr(watermark, "tournament_winners", biased_tournament)
    biased = torch.bincount(watermark.sample_batch(candidates, windows, vocab), minlength=vocab)
    assert chi_square_p(biased, probs) < 1e-6
    monkeypatch.undo()
    # ...and one window reused for every token (what repeated-window masking prevents).
    fixed = [(key, (1, 2, 3, 4))] * rows
    reused = torch.bincount(watermark.sample_batch(candidates, fixed, vocab), minlength=vocab)
    assert chi_square_p(reused, probs) < 1e-6
