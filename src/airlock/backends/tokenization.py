"""vLLM's tokenizer endpoints (``/tokenize``, ``/detokenize``, ``/tokenizer_info``): wire shapes, HF implementation.

The shapes follow vLLM's ``vllm/entrypoints/serve/tokenize/protocol.py``: a tokenize request is
either a completion request (``prompt``) or a chat request (``messages``); the response carries
``count``, ``max_model_len``, ``tokens`` and (on request) ``token_strs``. ``/tokenizer_info`` is the
tokenizer's ``init_kwargs`` made JSON-safe plus ``tokenizer_class`` (and the chat template), which
is what lm-eval's remote tokenizer reads (``eos_token``, ``bos_token``, ``chat_template``).

Airlock keeps the lab's file paths out of ``/tokenizer_info`` (see :func:`public_tokenizer_info`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from airlock.backends.protocol import ChatMessage, WireModel

__all__ = [
    "DetokenizeRequest",
    "DetokenizeResponse",
    "TokenizeChatRequest",
    "TokenizeCompletionRequest",
    "TokenizeRequest",
    "TokenizeResponse",
    "hf_detokenize",
    "hf_tokenize",
    "hf_tokenizer_info",
    "parse_tokenize_request",
    "public_tokenizer_info",
]

#: Longest text one tokenize request may carry (characters); a whole book is well below it.
MAX_TOKENIZE_CHARS = 4_000_000
#: Most token ids one detokenize request may carry.
MAX_DETOKENIZE_TOKENS = 1_000_000


class TokenizeCompletionRequest(WireModel):
    """``POST /tokenize`` with a ``prompt`` (vLLM's ``TokenizeCompletionRequest``)."""

    model: str | None = Field(default=None, description="A granted model id; default: the grant's variants.")
    prompt: str = Field(max_length=MAX_TOKENIZE_CHARS)
    add_special_tokens: bool = Field(default=True, description="Add the tokenizer's special tokens (e.g. BOS).")
    return_token_strs: bool | None = Field(default=False, description="Also return each token's string.")


class TokenizeChatRequest(WireModel):
    """``POST /tokenize`` with ``messages``, rendered by the model's chat template (vLLM's ``TokenizeChatRequest``)."""

    model: str | None = Field(default=None, description="A granted model id; default: the grant's variants.")
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one_ending(self) -> TokenizeChatRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class TokenizeResponse(WireModel):
    """The ``/tokenize`` answer."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(WireModel):
    """``POST /detokenize``."""

    model: str | None = Field(default=None, description="A granted model id; default: the grant's variants.")
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS)


class DetokenizeResponse(WireModel):
    """The ``/detokenize`` answer."""

    prompt: str


def parse_tokenize_request(body: Any) -> TokenizeRequest:
    """Validate a ``/tokenize`` body as a chat request when it has ``messages``, else as a completion request."""
    if isinstance(body, dict) and "messages" in body:
        return TokenizeChatRequest.model_validate(body)
    return TokenizeCompletionRequest.model_validate(body)


# Keys of a tokenizer's init_kwargs that name files or directories on the lab's machines.
_PATH_KEYS = frozenset({"name_or_path", "_name_or_path", "tokenizer_file", "vocab_file", "merges_file"})
_PATH_SUFFIXES = ("_file", "_path", "_dir", "_directory")


def public_tokenizer_info(info: dict[str, Any]) -> dict[str, Any]:
    """Return ``info`` without the keys that name the lab's files (paths of weights and tokenizer files)."""
    return {
        key: value
        for key, value in info.items()
        if key not in _PATH_KEYS and not key.endswith(_PATH_SUFFIXES) and key != "auto_map"
    }


def _json_safe(value: Any) -> Any:
    """Turn tokenizer config values JSON-safe as vLLM does (an ``AddedToken`` becomes its text)."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def hf_tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """Return vLLM's ``/tokenizer_info`` body for a Hugging Face tokenizer (paths left out)."""
    config = _json_safe(dict(getattr(tokenizer, "init_kwargs", None) or {}))
    config["tokenizer_class"] = type(tokenizer).__name__
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        config["chat_template"] = template
    # vLLM reports init_kwargs; the special tokens are what clients need, so make sure they are there.
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = getattr(tokenizer, name, None)
        if isinstance(token, str) and name not in config:
            config[name] = token
    return public_tokenizer_info(config)


def hf_tokenize(tokenizer: Any, request: TokenizeRequest, max_model_len: int) -> TokenizeResponse:
    """Tokenize ``request`` with a Hugging Face tokenizer as vLLM does."""
    if isinstance(request, TokenizeChatRequest):
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        kwargs: dict[str, Any] = {}
        if request.tools:
            kwargs["tools"] = request.tools
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            **kwargs,
        )
    else:
        text = request.prompt
    ids = [int(i) for i in tokenizer(str(text), add_special_tokens=request.add_special_tokens)["input_ids"]]
    strs = [str(s) for s in tokenizer.convert_ids_to_tokens(ids)] if request.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids, token_strs=strs)


def hf_detokenize(tokenizer: Any, request: DetokenizeRequest) -> DetokenizeResponse:
    """Detokenize ``request.tokens`` (ids outside the vocabulary are a ValueError)."""
    size = len(tokenizer)
    bad = [t for t in request.tokens if t < 0 or t >= size]
    if bad:
        raise ValueError(f"token id {bad[0]} is out of vocabulary (size {size})")
    return DetokenizeResponse(prompt=str(tokenizer.decode(request.tokens)))
