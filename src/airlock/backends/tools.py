"""Tool calling for local models whose chat template has no native tool support (SmolLM2).

The prompt format is the Hermes convention that Qwen2.5 and NousResearch's Hermes models were
trained on, so a model that knows any tool format most likely knows this one:

* **Offered tools** go into the system prompt (appended to the first system message, or in a new
  one) as one JSON function spec per line inside ``<tools></tools>``, with the instruction to
  answer with ``<tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>``
  blocks. ``tool_choice: "none"`` offers nothing; ``"required"`` and a named function add a line
  saying a call is mandatory; ``parallel_tool_calls: false`` asks for at most one call.
* **Assistant tool calls in the history** are rendered the same way, after any content.
* **Tool results** become a ``user`` turn with one ``<tool_response>...</tool_response>`` block
  per result (consecutive results share a turn), because templates without tool support accept
  only system, user and assistant turns reliably.
* **Forcing.** A named ``tool_choice`` starts the assistant's turn with
  ``<tool_call>{"name": "<fn>", "arguments": {``, so even a tiny model produces a call, and
  generation stops at ``</tool_call>``. ``"required"`` with a single tool does the same with that
  tool; with several, the model first writes the name after ``<tool_call>{"name": "``, sampled
  like any other text (the request's temperature, top_p and seed), and `match_function` maps
  what it wrote onto the offered names (exactly, else the most similar; the first offered when
  nothing is alike); that function is then forced. The choice depends on the sampled text only:
  no name is ranked by log-probability, so a key without the ``logprobs`` scope learns nothing
  sampling would not tell it. Arguments the model leaves
  unfinished (the token budget ran out, or it wrote something that is not JSON) are cut back to
  their longest well-formed prefix and closed, so a forced call always carries a JSON object
  (``finish_reason`` stays ``length`` when the budget ran out).
* **Parsing.** Text before the first ``<tool_call>`` is the message content; each block must
  hold a JSON object whose ``name`` is an offered function and whose ``arguments`` (or
  ``parameters``) is an object or a JSON-encoded object. Whitespace, code fences and a missing
  final ``</tool_call>`` are tolerated; text after the calls (a small model often imagines the
  tool's answer) is dropped. If any block is invalid, nothing is parsed: the whole generation
  is returned as plain content, so the evaluator sees exactly what the model wrote.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from airlock.backends.protocol import ChatCompletionRequest, ChatMessage, ToolChoiceMode, new_id

__all__ = [
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "ParsedGeneration",
    "ToolPlan",
    "close_json_prefix",
    "match_function",
    "parse_generation",
    "plan_tools",
    "render_messages",
    "stream_tool_call_deltas",
]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

_INSTRUCTIONS = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    "<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n'
    "</tool_call>"
)
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses tools: the functions its prompt offers and whether a call is forced."""

    mode: ToolChoiceMode = "none"
    #: Function specs (``tools[].function``) offered in the prompt; empty when ``mode`` is none.
    functions: tuple[dict[str, Any], ...] = ()
    #: The function every answer must call (a named ``tool_choice``, or ``required`` with one tool).
    forced: str | None = None
    #: Whether more than one call per answer is allowed (``parallel_tool_calls``).
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Whether tools are offered at all (otherwise generations are plain text)."""
        return self.mode != "none" and bool(self.functions)

    @property
    def names(self) -> frozenset[str]:
        """Names of the offered functions."""
        return frozenset(str(f["name"]) for f in self.functions)

    @property
    def ordered_names(self) -> tuple[str, ...]:
        """Names of the offered functions, in the order the request lists them."""
        return tuple(str(f["name"]) for f in self.functions)

    def system_block(self) -> str:
        """Return the tool instructions for the system prompt (empty when no tools are offered)."""
        if not self.active:
            return ""
        specs = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in self.functions)
        text = _INSTRUCTIONS.format(tools=specs)
        if self.mode == "function":
            text += f"\n\nYou must call the function {self.forced!r} now."
        elif self.mode == "required":
            text += "\n\nYou must call at least one function now."
        if not self.parallel:
            text += "\n\nCall at most one function."
        return text

    def generation_prefix(self) -> str:
        """Return the text the assistant's turn starts with (it is part of the generation)."""
        if not self.active:
            return ""
        if self.forced is not None:
            return f'{TOOL_CALL_OPEN}{{"name": {json.dumps(self.forced)}, "arguments": {{'
        if self.mode == "required":
            return f'{TOOL_CALL_OPEN}{{"name": "'
        return ""

    def stop_sequences(self) -> list[str]:
        """Return extra stop sequences: a forced answer is exactly one call."""
        return [TOOL_CALL_CLOSE] if self.active and (self.forced is not None or not self.parallel) else []


def match_function(written: str, names: Sequence[str]) -> str:
    """Return the offered name the model meant by ``written``: itself, else the most similar, else the first.

    Similarity is difflib's ratio; ties go to the name offered first. The result depends on the
    text alone, never on scores the model gives the names.
    """
    if not names:
        raise ValueError("no function is offered")
    written = written.strip()
    if written in names:
        return written
    ratios = [difflib.SequenceMatcher(None, written, name).ratio() for name in names]
    best = max(range(len(names)), key=lambda i: (ratios[i], -i))
    return names[best]


def plan_tools(request: ChatCompletionRequest) -> ToolPlan:
    """Return the tool plan of a (validated) chat request."""
    mode = request.tool_mode()
    if mode == "none":
        return ToolPlan()
    functions = tuple(spec.function.model_dump(exclude_none=True) for spec in request.tool_specs())
    forced = request.forced_function()
    if mode == "required" and len(functions) == 1:
        forced = str(functions[0]["name"])
    parallel = request.parallel_tool_calls is not False
    return ToolPlan(mode=mode, functions=functions, forced=forced, parallel=parallel)


# ---------------------------------------------------------------- rendering


def _call_text(name: str, arguments: str) -> str:
    """Render one tool call as the model is asked to write it."""
    try:
        args: Any = json.loads(arguments)
    except ValueError:
        args = arguments  # the client's own history; keep what it sent, readable
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def render_messages(messages: Sequence[ChatMessage], plan: ToolPlan) -> list[dict[str, str]]:
    """Return ``messages`` as plain system/user/assistant turns, tools and tool traffic rendered as text."""
    rendered: list[dict[str, str]] = []
    pending_results: list[str] = []

    def flush_results() -> None:
        if pending_results:
            rendered.append({"role": "user", "content": "\n".join(pending_results)})
            pending_results.clear()

    for message in messages:
        if message.role == "tool":
            pending_results.append(f"<tool_response>\n{message.text()}\n</tool_response>")
            continue
        flush_results()
        # Chat templates know system/user/assistant; developer is OpenAI's newer name for system.
        role = "system" if message.role == "developer" else message.role
        content = message.text()
        if message.role == "assistant" and message.tool_calls:
            calls = [_call_text(c.function.name, c.function.arguments) for c in message.parsed_tool_calls()]
            content = "\n".join([content, *calls]) if content else "\n".join(calls)
        rendered.append({"role": role, "content": content})
    flush_results()

    block = plan.system_block()
    if block:
        if rendered and rendered[0]["role"] == "system":
            first = rendered[0]["content"]
            rendered[0] = {"role": "system", "content": f"{first}\n\n{block}" if first else block}
        else:
            rendered.insert(0, {"role": "system", "content": block})
    return rendered


# ---------------------------------------------------------------- parsing


@dataclass
class ParsedGeneration:
    """A generation split into message content and OpenAI-shaped tool calls."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def parse_generation(text: str, plan: ToolPlan) -> ParsedGeneration:
    """Split ``text`` (generation prefix included) into content and tool calls; see the module docstring."""
    if not plan.active:
        return ParsedGeneration(content=text)
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return ParsedGeneration(content=text)
    prefixed = bool(plan.generation_prefix()) and text.startswith(plan.generation_prefix())
    calls: list[dict[str, Any]] = []
    pos = start
    while pos >= 0:
        body_start = pos + len(TOOL_CALL_OPEN)
        end = text.find(TOOL_CALL_CLOSE, body_start)
        body = text[body_start:] if end < 0 else text[body_start:end]
        # Only the block Airlock started itself may be repaired (and named, when forced); a model's
        # own malformed call is returned as text instead of being guessed at.
        call = _parse_block(body, plan, ours=prefixed and not calls)
        if call is None:
            return ParsedGeneration(content=text)
        calls.append(call)
        if end < 0:
            break
        pos = text.find(TOOL_CALL_OPEN, end + len(TOOL_CALL_CLOSE))
    if not plan.parallel:
        calls = calls[:1]
    content = text[:start].strip()
    return ParsedGeneration(content=content or None, tool_calls=calls)


def _parse_block(body: str, plan: ToolPlan, *, ours: bool) -> dict[str, Any] | None:
    """Return the OpenAI tool call in one ``<tool_call>`` block, or ``None`` when it is invalid.

    ``ours``: the block was started by the generation prefix, so it may be repaired, and a
    forced function's name (which Airlock wrote) stands whatever the model added after it.
    """
    body = _FENCE.sub("", body.strip())
    obj: Any = None
    try:
        obj, _end = json.JSONDecoder().raw_decode(body)  # trailing text after the object is ignored
    except ValueError:
        if ours:
            closed = close_json_prefix(body)
            if closed is not None:
                obj = json.loads(closed)
    if not isinstance(obj, dict):
        return None
    name = plan.forced if ours and plan.forced is not None else obj.get("name")
    if not isinstance(name, str) or name not in plan.names:
        return None
    if plan.forced is not None and name != plan.forced:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # some models encode the arguments twice, as OpenAI's wire does
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {
        "id": new_id("call_"),
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_LITERALS = ("true", "false", "null")
_WS = " \t\r\n"


def close_json_prefix(text: str) -> str | None:
    """Return the longest well-formed prefix of the JSON object in ``text``, closed; ``None`` if there is none.

    ``{"a": 1, "b": [tr`` becomes ``{"a": 1, "b": []}``: incomplete members and values are
    dropped and open containers closed. Scanning stops at the first character that cannot
    continue valid JSON, so anything after it is dropped too.
    """
    # One [closer, state] per open container. Object states: "first" (a key or "}"), "key",
    # "colon", "value", "next" ("," or "}"); array states: "first" (a value or "]"), "value", "next".
    stack: list[list[str]] = []
    best: tuple[int, str] | None = None
    i, n = 0, len(text)

    def commit(at: int) -> None:
        # A point where closing every open container yields valid JSON.
        nonlocal best
        best = (at, "".join(closer for closer, _ in reversed(stack)))

    def string_end(at: int) -> int | None:
        """Return the index after the string opening at ``at``, or None if it is unterminated or invalid."""
        j = at + 1
        while j < n:
            ch = text[j]
            if ch == "\\":
                if j + 1 >= n or text[j + 1] not in '"\\/bfnrtu':
                    return None
                j += 2
            elif ch == '"':
                return j + 1
            elif ch < " ":
                return None  # raw control characters are not allowed inside JSON strings
            else:
                j += 1
        return None

    def value_end(at: int) -> int | None:
        """Return the index after the scalar value at ``at``, or None."""
        if text[at] == '"':
            return string_end(at)
        match = _NUMBER.match(text, at)
        if match:
            # A number touching the end of the text may have been cut off mid-way (12 of 125).
            return match.end() if match.end() < n else None
        return next((at + len(w) for w in _LITERALS if text.startswith(w, at)), None)

    if not text.lstrip(_WS).startswith("{"):
        return None
    while i < n:
        ch = text[i]
        if ch in _WS:
            i += 1
            continue
        if not stack:
            if best is not None:
                break  # the top-level object is complete
            stack.append(["}", "first"])
            i += 1
            commit(i)
            continue
        top = stack[-1]
        closer, state = top
        if ch == closer and state in ("first", "next"):
            stack.pop()
            i += 1
            if stack:
                stack[-1][1] = "next"
            commit(i)
            continue
        if closer == "}" and state in ("first", "key"):
            end = string_end(i) if ch == '"' else None
            if end is None:
                break
            top[1] = "colon"
            i = end
        elif state == "colon":
            if ch != ":":
                break
            top[1] = "value"
            i += 1
        elif state == "next":
            if ch != ",":
                break
            top[1] = "key" if closer == "}" else "value"
            i += 1
        elif ch in "{[":
            top[1] = "next"
            stack.append(["}" if ch == "{" else "]", "first"])
            i += 1
            commit(i)
        else:
            end = value_end(i)
            if end is None:
                break
            top[1] = "next"
            i = end
            commit(i)
    if best is None:
        return None
    at, closers = best
    candidate = text[:at] + closers
    try:
        json.loads(candidate)
    except ValueError:  # defensive: the scanner is meant to be stricter than JSON; never trust it blindly
        return None
    return candidate


def stream_tool_call_deltas(tool_calls: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return complete tool calls as streaming deltas (OpenAI's shape, with ``index``), one per call."""
    return [{"index": i, **call} for i, call in enumerate(tool_calls)]
