"""Per-row logits processors: the steps between the model's logits and the sampler.

Each row of a batch carries its own processors, applied in order to that row's next-token logits
before temperature, top-p and the draw (greedy picks from the processed logits too), and told which
token was chosen so they can advance their state. Reported log-probabilities stay those of the
model's raw distribution, as vLLM reports them by default. A new step (a watermark, a grammar of
another library) is one more class with these two methods, added to the row's tuple.

* :class:`LogitBias` adds OpenAI's ``logit_bias`` to chosen token ids;
* :class:`RepetitionPenalties` applies ``presence_penalty`` and ``frequency_penalty`` as OpenAI
  defines them, over the tokens this row has generated (not the prompt);
* :class:`GrammarConstraint` masks every token an ``llguidance`` matcher (a JSON schema, compiled
  to a grammar) would refuse, so ``response_format`` output parses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch

from airlock.errors import BackendError

__all__ = ["GrammarConstraint", "LogitBias", "LogitsProcessor", "RepetitionPenalties"]


class LogitsProcessor(Protocol):
    """One step between a row's logits and its sampler."""

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Return the row's next-token logits (a 1-D float tensor, which may be changed in place)."""
        ...

    def accept(self, token_id: int) -> None:
        """Advance past the token the row generated."""
        ...


class LogitBias:
    """Adds a fixed bias to some token ids' logits (OpenAI ``logit_bias``: -100 bans, 100 forces)."""

    def __init__(self, bias: Mapping[int, float], device: torch.device) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long, device=device)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32, device=device)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Add the biases."""
        logits.index_add_(0, self.ids, self.values)
        return logits

    def accept(self, token_id: int) -> None:
        """Nothing to track."""


class RepetitionPenalties:
    """``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty`` over generated tokens."""

    def __init__(self, presence: float, frequency: float, vocab_size: int, device: torch.device) -> None:
        self.presence = presence
        self.frequency = frequency
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Subtract the penalties of the tokens generated so far."""
        logits -= self.counts * self.frequency + (self.counts > 0).float() * self.presence
        return logits

    def accept(self, token_id: int) -> None:
        """Count the token."""
        if 0 <= token_id < self.counts.shape[0]:
            self.counts[token_id] += 1


class GrammarConstraint:
    """Allows only the tokens an ``llguidance`` matcher accepts next; end-of-sequence once it is complete."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bitmask = np.full((1, (vocab_size + 31) // 32), -1, dtype=np.int32)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Set every token the grammar refuses to -inf."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        self._check()
        allowed = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")[: logits.shape[0]]
        refused = torch.from_numpy(allowed == 0).to(logits.device)
        logits.masked_fill_(refused, float("-inf"))
        return logits

    def accept(self, token_id: int) -> None:
        """Advance the matcher (a stopped grammar only sees the end-of-sequence token)."""
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token_id)
            self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise BackendError(f"constrained decoding failed: {self.matcher.get_error()}")
