"""OpenAI's request bodies (the fields jint8 serves) and its error body.

Unknown fields are ignored, as OpenAI-compatible servers do for options they do not implement;
fields jint8 cannot honour with a non-default value (n > 1) are refused with the field named.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from jint8.errors import InvalidRequestError
from jint8.serve.config import SamplingOptions


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # OpenAI's range and default
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # extension (vLLM's name); 0 = off
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(default=None, ge=0, lt=2**32)
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4:
            raise InvalidRequestError(f"stop has {len(stops)} sequences (at most 4)", "stop")
        return stops

    def sampling(self, default_max_tokens: int) -> SamplingOptions:
        if self.n != 1:
            raise InvalidRequestError(f"n={self.n}: only n=1 is supported", "n")
        return SamplingOptions(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                               top_p=self.top_p, top_k=self.top_k, seed=self.seed)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)

    def sampling(self, default_max_tokens: int) -> SamplingOptions:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().sampling(default_max_tokens)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False


def error_body(message: str, error_type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    """OpenAI's error object, which its client raises as BadRequestError / RateLimitError / ..."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def validation_param(loc: tuple) -> str:
    """The field a pydantic error location names: ("body", "messages", 0, "role") -> "messages.0.role"."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"
