"""A keyed, distortion-free watermark for sampled text: tournament sampling over keyed g-values.

The scheme is SynthID-Text's tournament sampling (Dathathri et al., Nature 2024) with binary
g-values and repeated-context masking. For each generated token, the ``CONTEXT`` token ids before
it and the grant's key select ``LAYERS`` pseudorandom bits per vocabulary entry (the g-values):
ChaCha20 (from ``cryptography``) keyed by HMAC-SHA256(grant key, window) expands to one byte per
vocabulary entry. A tournament of ``2**LAYERS`` candidates drawn from the model's distribution,
each match won by the higher g-value of that layer (ties at random), picks the token. The
tournament's outcome distribution is computed exactly and sampled with the row's own random
generator, so:

- identical requests still produce different outputs (the randomness is fresh per request, as
  without a watermark; seeded requests stay reproducible);
- averaged over keys, each token's distribution is exactly the model's (for binary g-values,
  ``E[q(x) (1 + g(x) - sum_y q(y) g(y))] = q(x)``), and a window already used in the same
  response is sampled plainly, so one response's distribution over keys is the model's too;
- detection needs only the key and the text: under no watermark the g-values of the observed
  tokens (each window counted once) are independent fair bits, so the count of ones is
  Binomial(n, 1/2) and gives an exact p-value; no nonce or prompt needs to be searched.

Sampling runs the tournament itself (``sample_batch``): each row draws ``2**LAYERS`` candidates
from its distribution with its own generator (one multinomial call, as plain sampling makes), and
the matches of every row and every layer run as a handful of tensor operations over the batch.
With candidates drawn independently, a tie may go to the left one: the pair is exchangeable, so
the winner's distribution is the exact ``q(x) (1 + g(x) - E_q[g])`` of a random tie-break
(``tournament`` computes it, and the tests compare the two). The g-values come from one ChaCha20
key stream per row and step, gathered at the candidates.

Greedy decoding (temperature 0) has no randomness to steer and carries no watermark.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy.stats import binom

__all__ = [
    "CANDIDATES",
    "CONTEXT",
    "LAYERS",
    "SCHEME",
    "Detection",
    "WatermarkStream",
    "detect",
    "draw_candidates",
    "g_values",
    "sample_batch",
    "scored_positions",
    "token_g_value",
    "tournament",
    "tournament_winners",
]

SCHEME = "tournament-g8-h4-v1"
"""Name of the scheme and its parameters, recorded with each grant that watermarks."""
CONTEXT = 4
"""Token ids before a token that key its g-values (the sliding context window)."""
LAYERS = 8
"""Tournament layers: one g-value bit per layer, one byte of key stream per vocabulary entry."""

_PATTERNS = 1 << LAYERS
CANDIDATES = _PATTERNS
"""Candidates a tournament of ``LAYERS`` rounds starts from."""
_ZERO_NONCE = bytes(16)  # every window has its own ChaCha20 key, so one nonce suffices
# bit[layer, pattern]: the g-value a pattern (one key-stream byte) has at each layer.
_PATTERN_BITS = torch.tensor(
    [[(pattern >> layer) & 1 for pattern in range(_PATTERNS)] for layer in range(LAYERS)], dtype=torch.float64
)


def _window_key(key: bytes, window: Sequence[int]) -> bytes:
    """Return the ChaCha20 key of one context window (HMAC-SHA256 of the token ids under the grant key)."""
    return hmac.new(key, struct.pack(f"<{len(window)}q", *window), hashlib.sha256).digest()


def g_values(key: bytes, window: Sequence[int], vocab_size: int) -> np.ndarray:
    """Return the g-value byte of every vocabulary entry after ``window`` (bit ``l`` = layer ``l``)."""
    encryptor = Cipher(algorithms.ChaCha20(_window_key(key, window), _ZERO_NONCE), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(vocab_size)), dtype=np.uint8)


def token_g_value(key: bytes, window: Sequence[int], token: int) -> int:
    """Return the g-value byte of ``token`` after ``window`` (one ChaCha20 block, not the whole vocabulary)."""
    block, offset = divmod(token, 64)
    # RFC 7539 layout as `cryptography` takes it: a 4-byte little-endian block counter, then the nonce.
    nonce = struct.pack("<I", block) + _ZERO_NONCE[4:]
    encryptor = Cipher(algorithms.ChaCha20(_window_key(key, window), nonce), mode=None).encryptor()
    return encryptor.update(bytes(offset + 1))[offset]


def tournament(probs: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Return the distribution of a ``LAYERS``-layer tournament's winner among candidates drawn from ``probs``.

    ``patterns`` holds each vocabulary entry's g-value byte. Each layer's match between two
    candidates drawn from ``q`` is won by ``x`` with probability ``q(x) (1 + g(x) - E_q[g])``;
    the factor depends only on the pattern, so the layers run over pattern masses.
    """
    index = patterns.to(torch.long)
    # Pattern masses are summed in the probabilities' precision, then the 256-entry tournament runs in float64.
    mass = torch.zeros(_PATTERNS, dtype=probs.dtype, device=probs.device).index_add_(0, index, probs)
    mass = mass.to(torch.float64)
    bits = _PATTERN_BITS.to(probs.device)
    factor = torch.ones(_PATTERNS, dtype=torch.float64, device=probs.device)
    for layer in range(LAYERS):
        g = bits[layer]
        current = mass * factor
        mean_g = (current * g).sum() / current.sum()
        factor = factor * (1.0 + g - mean_g)
    tilted = probs * factor.to(probs.dtype)[index]
    return tilted / tilted.sum()


@dataclass
class WatermarkStream:
    """One generated sequence's watermark state: its key, the last token ids, the windows already used."""

    key: bytes
    recent: list[int] = field(default_factory=list)
    seen: set[tuple[int, ...]] = field(default_factory=set)

    @classmethod
    def start(cls, key: bytes) -> WatermarkStream:
        """Begin a stream: the first ``CONTEXT`` generated tokens are sampled plainly.

        Windows hold generated tokens only. A window reaching into the prompt would key the first
        tokens of every answer by the prompt's end, which a chat template makes the same for every
        question of an evaluation: one tilt, not averaged out over contexts, on the very tokens
        that decide many answers. A leaked text carries no prompt to score those tokens with anyway.
        """
        return cls(key=key)

    def tilt(self, probs: torch.Tensor) -> torch.Tensor:
        """Return the distribution to sample the next token from: the tournament's, or ``probs`` unchanged.

        A window shorter than ``CONTEXT`` (the first generated tokens) or one already used in this
        sequence is sampled plainly: a repeated window would repeat the same bias.
        """
        window = self.next_window()
        if window is None:
            return probs
        patterns = torch.from_numpy(g_values(self.key, window, probs.shape[0]).copy()).to(probs.device)
        return tournament(probs, patterns)

    def next_window(self) -> tuple[int, ...] | None:
        """Return the window keying the next token and mark it used; ``None`` when it is to be sampled plainly."""
        window = tuple(self.recent)
        if len(window) < CONTEXT or window in self.seen:
            return None
        self.seen.add(window)
        return window

    def advance(self, token: int) -> None:
        """Slide the window past the token just sampled."""
        self.recent.append(token)
        if len(self.recent) > CONTEXT:
            del self.recent[0]


def tournament_winners(candidates: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Return each row's tournament winner among ``candidates`` (``[rows, 2**LAYERS]`` token ids).

    ``patterns`` holds the candidates' g-value bytes. Round ``l`` pairs neighbours and keeps the
    one whose layer-``l`` bit is higher, the left one on a tie (exact for independent candidates:
    see the module docstring). All rows and both halves of every round are single tensor operations.
    """
    if candidates.shape[-1] != CANDIDATES or patterns.shape != candidates.shape:
        raise ValueError(f"a tournament needs {CANDIDATES} candidates per row and their g-value bytes")
    ids, bytes_ = candidates, patterns.to(torch.int32)
    for layer in range(LAYERS):
        bits = (bytes_ >> layer) & 1
        right = bits[:, 1::2] > bits[:, 0::2]
        ids = torch.where(right, ids[:, 1::2], ids[:, 0::2])
        bytes_ = torch.where(right, bytes_[:, 1::2], bytes_[:, 0::2])
    return ids[:, 0]


def draw_candidates(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one row's ``2**LAYERS`` tournament candidates from ``probs`` with the row's own generator.

    The randomness is fresh per request, as without a watermark: identical requests stay diverse
    and seeded ones reproduce. Raises ``RuntimeError`` on an invalid distribution (NaN, negative).
    """
    return torch.multinomial(probs, CANDIDATES, replacement=True, generator=generator)


def sample_batch(
    candidates: torch.Tensor, keys: Sequence[tuple[bytes, Sequence[int]]], vocab_size: int
) -> torch.Tensor:
    """Return each row's watermarked token: the tournament among its candidates under ``keys[i]`` = (key, window).

    ``candidates`` is ``[rows, 2**LAYERS]`` (``draw_candidates`` per row). Every row's g-values
    come from one ChaCha20 key stream over the vocabulary, read at its candidates; the tournament
    then runs over the whole batch at once. The result is on the candidates' device.
    """
    on_cpu = candidates.cpu()
    picked = on_cpu.numpy()
    patterns = np.stack(
        [g_values(key, window, vocab_size)[row] for (key, window), row in zip(keys, picked, strict=True)]
    )
    return tournament_winners(on_cpu, torch.from_numpy(patterns)).to(candidates.device)


@dataclass(frozen=True)
class Detection:
    """The watermark test of one key over one token sequence."""

    scored_tokens: int
    """Tokens whose window was new (each distinct window counts once)."""
    ones: int
    """g-value bits that were 1, out of ``scored_tokens * LAYERS``."""
    p_value: float
    """P(at least ``ones`` ones | the text does not carry this key's watermark), exact binomial."""

    @property
    def mean_g(self) -> float:
        """Return the fraction of g-value bits that were 1 (0.5 expected without the watermark)."""
        bits = self.scored_tokens * LAYERS
        return self.ones / bits if bits else math.nan


def scored_positions(token_ids: Sequence[int]) -> Iterable[tuple[tuple[int, ...], int]]:
    """Yield ``(window, token)`` for every token whose window is complete and seen for the first time."""
    seen: set[tuple[int, ...]] = set()
    for i in range(CONTEXT, len(token_ids)):
        window = tuple(token_ids[i - CONTEXT : i])
        if window in seen:
            continue
        seen.add(window)
        yield window, token_ids[i]


def detect(key: bytes, token_ids: Sequence[int]) -> Detection:
    """Test ``token_ids`` for the watermark of ``key``: the binomial tail of its g-value bits."""
    positions = list(scored_positions(token_ids))
    ones = sum(int(token_g_value(key, window, token)).bit_count() for window, token in positions)
    bits = len(positions) * LAYERS
    p_value = float(binom.sf(ones - 1, bits, 0.5)) if bits else 1.0
    return Detection(scored_tokens=len(positions), ones=ones, p_value=p_value)
