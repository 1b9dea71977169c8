"""OpenAI-compatible request bodies (completions and chat completions) and the SLO extension.

Validation is split by HTTP meaning (see ``errors.from_validation_error``): a field of the
wrong JSON type is a 422, a value out of range (negative or NaN temperature, ``n`` > 1, an
empty prompt) is a 400. Types are strict: ``"10"`` is not a valid ``max_tokens``.

Parameters that OpenAI defines but this server does not implement (logprobs, echo, best_of,
penalties, tools...) are refused with a 400 naming them when set to a non-default value,
rather than silently ignored. Unknown extra fields are ignored, as OpenAI-compatible servers
commonly do, because clients add vendor fields freely.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flowprefill_ray.sampling_params import MAX_CACHE_SALT_CHARS, MAX_SEED, MIN_SEED

# Parameters we do not implement, and the values that mean "not used".
_UNSUPPORTED_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}

MAX_STOP_SEQUENCES = 4  # OpenAI's limit

PositiveFiniteFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _GenerationFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = 1
    stop: str | list[str] | None = None
    # torch's 64-bit seed range (see sampling_params.MIN_SEED): larger values are a 400 here,
    # not an overflow inside a prefill batch shared with other requests.
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    # vLLM's extension for fixed-length benchmarks; strict like every field ("false" is a 422).
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # SLO extension: a named class, or an explicit TTFT target in milliseconds.
    slo_class: str | None = None
    ttft_slo_ms: PositiveFiniteFloat | None = None
    # vLLM's extension: requests share prefix-cached KV only with requests of the same salt
    # (docs/RUNTIME.md, "Prefix cache"). A tenant sets its own to keep its prompts' cache
    # timing unobservable by other tenants.
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got n={n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stop

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _GenerationFields:
        for name, value in (self.model_extra or {}).items():
            allowed = _UNSUPPORTED_DEFAULTS.get(name)
            if allowed is not None and value not in allowed:
                raise ValueError(f"parameter {name!r} is not supported by this server")
        return self

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_GenerationFields):
    """POST /v1/completions. ``prompt`` is text or a list of token ids; OpenAI's batch forms
    (a list of several prompts) are accepted only with a single element, since n=1."""

    prompt: Union[str, list[int], list[str], list[list[int]]]

    @field_validator("prompt")
    @classmethod
    def _single_nonempty_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(
                    f"only one prompt per request is supported, got a batch of {len(prompt)}"
                )
            prompt = prompt[0]
        if len(prompt) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(prompt, list) and any(t < 0 for t in prompt):
            raise ValueError("token ids must be non-negative")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationFields):
    """POST /v1/chat/completions. Text content only (plain strings or ``text`` parts)."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @field_validator("messages")
    @classmethod
    def _nonempty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("messages must not be empty")
        if all(not m.text() for m in messages):
            raise ValueError("messages carry no text")
        return messages

    @property
    def requested_max_tokens(self) -> int | None:
        # The newer OpenAI name wins when both are sent.
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the tokenizer's chat template expects them (plain text content)."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]
