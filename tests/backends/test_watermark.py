"""The tournament watermark: keyed g-values, the exact tilt, distortion-freeness over keys, and the detector."""

from __future__ import annotations

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
    stream = WatermarkStream.start(key, ids) if key is not None else None
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
    stream = WatermarkStream.start(b"k" * 32, [1, 2, 3, 4])
    probs = toy_distribution((1, 2, 3, 4))
    assert not torch.equal(stream.tilt(probs), probs)
    assert torch.equal(stream.tilt(probs), probs)  # the same window again: untouched
    short = WatermarkStream.start(b"k" * 32, [1, 2])
    assert torch.equal(short.tilt(probs), probs)  # no full window yet
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
