"""Pydantic models of the request bodies the server accepts.

Every bound a decode needs is checked here, so a request that passes validation
cannot fail inside the worker for a reason the client could have avoided.
Unknown fields are ignored (clients send many optional OpenAI fields); docs/serving.md
has the per-field table of what is supported.
"""

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["ar", "diffusion", "spec"]
MAX_N = 16  # most choices one request may ask for
MAX_PROMPTS = 256  # most prompts in one text-completion request
MAX_LOGPROBS = 20  # most top_logprobs per token (OpenAI's limit)
MAX_LOGIT_BIAS = 1024  # most logit_bias entries


class StreamOptions(BaseModel):
    include_usage: bool = False


class DecodeRequest(BaseModel):
    """The fields shared by chat and text completions: sampling, mode and stopping."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0: greedy (decoding_options)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]]] = Field(
        None, max_length=MAX_LOGIT_BIAS
    )
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=4)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    mode: Optional[Mode] = None
    block_len: Optional[int] = Field(None, ge=1, le=1024)  # None: the model's
    steps: Optional[int] = Field(None, ge=1, le=1024)  # arcLM: denoising steps per block
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    k: int = Field(8, ge=2, le=256)
    n: int = Field(1, ge=1, le=MAX_N)
    dhara_stats: bool = False  # extension: a "dhara" object with the run's stats on each chunk
    dhara_blocks: bool = False  # extension: stream each diffusion step's block (docs/serving.md)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop):
        """OpenAI's ``stop`` is a string, a list of up to 4, or null."""
        if stop is None:
            return []
        return [stop] if isinstance(stop, str) else stop

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias):
        """OpenAI's logit_bias keys are token ids written as strings."""
        for key in bias or {}:
            if not (key.strip().isascii() and key.strip().isdigit()):
                raise ValueError(f"logit_bias keys are token ids (digits); got {key!r}")
        return bias

    @property
    def bias(self) -> dict[int, float]:
        """``logit_bias`` with int keys."""
        return {int(key): value for key, value in (self.logit_bias or {}).items()}

    @property
    def top_logprobs_count(self) -> Optional[int]:
        """How many alternatives each generated token's logprobs list; None: no logprobs."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def token_limit(self) -> Optional[int]:
        """The requested max_tokens, None for the server default."""
        return self.max_tokens


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: Union[str, dict[str, Any]]


class ToolCall(BaseModel):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None

    def template_dict(self) -> dict:
        """The message as the chat template reads it (text parts joined, developer = system)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": content,
        }
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return message


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionRequest(DecodeRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def top_logprobs_count(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_tools(self) -> Optional[list[dict]]:
        """The tools for the chat template, or None when there are none or they are off."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    @property
    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(DecodeRequest):
    """A text completion; ``prompt`` is text, token ids, or a batch of either."""

    prompt: Union[str, TokenIds, list[Union[str, TokenIds]]]
    max_tokens: Optional[int] = Field(None, ge=0)  # 0: only score the prompt (echo)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompt_batch(cls, prompt):
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt is empty")
        return prompt

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """Each prompt of the request: text or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    @property
    def top_logprobs_count(self) -> Optional[int]:
        return self.logprobs

    @property
    def scoring(self) -> bool:
        """Echo with logprobs: the prompt tokens' log-probabilities are asked for."""
        return self.echo and self.logprobs is not None
