"""What one model call returns, shared by the client (llm.py) and the provider backends (providers.py).

Usage:
    from longalign_lib.reply import Reply, ContextTooLong, empty_usage, norm_finish
    reply = Reply("4", finish_reason=norm_finish("end_turn"))   # Reply(text, usage, model, cached, ...)
    reply.truncated                                             # cut at max_new_tokens: never train on it

A backend fills `usage` (see `empty_usage`) and the normalised finish reason; a local backend raises
`ContextTooLong` when the prompt does not fit the model's window.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .io import LongAlignError

USAGE_KEYS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


def empty_usage() -> dict:
    """{input_tokens (all prompt tokens, cached ones included), output_tokens, cache_read_tokens, cache_write_tokens}."""
    return dict.fromkeys(USAGE_KEYS, 0)


@dataclass
class Reply:
    """One model answer. `usage`: see `empty_usage`; `cached` replies cost nothing again."""

    text: str
    usage: dict = field(default_factory=empty_usage)
    model: str = ""
    cached: bool = False
    cost_usd: float = 0.0
    logprobs: list | None = None  # per-token log-probabilities, when asked for (openai: logprobs=True, top_logprobs=k)
    finish_reason: str | None = None  # "stop" (the model ended), "length" (cut at max_new_tokens), other, or None

    @property
    def truncated(self) -> bool:
        """True when the reply was cut by the token cap: never keep such a reply as training data.

        >>> Reply("The answer is", finish_reason="length").truncated
        True
        >>> Reply("The answer is 4.", finish_reason="stop").truncated
        False
        """
        return self.finish_reason == "length"


def norm_finish(reason) -> str | None:
    """One vocabulary for why generation ended: OpenAI's `finish_reason`, Anthropic's `stop_reason`, local.

    >>> [norm_finish(r) for r in ("stop", "length", "max_tokens", "end_turn", "stop_sequence", None)]
    ['stop', 'length', 'length', 'stop', 'stop', None]
    """
    if reason is None:
        return None
    r = str(reason)
    if r in ("length", "max_tokens", "model_length"):
        return "length"
    if r in ("stop", "end_turn", "stop_sequence", "eos"):
        return "stop"
    return r


class ContextTooLong(LongAlignError):
    """The prompt does not fit the local model's window (callers may skip that one item)."""
