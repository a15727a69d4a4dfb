"""The reward server's HTTP contract (docs/design.md, "Reward server HTTP API"): the request and
response bodies, the endpoint paths, the default request limits and the token's environment
variable. No FastAPI here: clients and the app read the same models.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ScoreItem",
    "ScoreRequest",
    "ItemScore",
    "ScoreResponse",
    "OpenRLHFRequest",
    "OpenRLHFResponse",
    "HealthResponse",
    "RewardFunctionInfo",
    "RewardFunctionsResponse",
    "ErrorResponse",
    "TOKEN_ENV",
    "DEFAULT_MAX_ITEMS",
    "DEFAULT_MAX_CHARS",
    "DEFAULT_MAX_BODY_BYTES",
    "PUBLIC_PATHS",
    "ENDPOINTS",
]

TOKEN_ENV = "PAPO_REWARD_TOKEN"
DEFAULT_MAX_ITEMS = 8192
DEFAULT_MAX_CHARS = 65536
DEFAULT_MAX_BODY_BYTES = 64 << 20
# Paths any caller may read without the token: liveness probes and the API description.
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
# Paths the request metrics name; any other path is counted as "other".
ENDPOINTS = frozenset({"/v1/score", "/get_reward", "/healthz", "/v1/reward-functions", "/metrics"}) | PUBLIC_PATHS


class ScoreItem(BaseModel):
    """One response to grade against its ground truth."""

    response: str = Field(description="the model's full response text")
    ground_truth: str = Field(description="the reference answer")


class ScoreRequest(BaseModel):
    """Body of ``POST /v1/score``."""

    reward_fn: str | None = Field(None, description="a registered reward function; default: the server's")
    items: list[ScoreItem]


class ItemScore(BaseModel):
    """The grade of one item; a failed item scores 0 with ``error`` saying why."""

    overall: float
    accuracy: float
    format: float
    error: str | None = Field(
        None, description='null when graded; "timeout", "worker_crashed", "deadline" or an exception type'
    )


class ScoreResponse(BaseModel):
    """Body of the ``POST /v1/score`` answer: one score per item, in request order."""

    scores: list[ItemScore]
    reward_fn: str


class OpenRLHFRequest(BaseModel):
    """Body of ``POST /get_reward`` as OpenRLHF's remote reward model sends it.

    ``query[i]`` is prompt + response; when ``prompts[i]`` prefixes it, the prefix is removed
    before grading. Fields OpenRLHF forks add (metadata, templates, ...) are ignored.
    """

    model_config = ConfigDict(extra="ignore")

    query: list[str]
    prompts: list[str] | None = None
    labels: list[str]
    reward_fn: str | None = Field(None, description="papo extension; default: the server's")

    @model_validator(mode="after")
    def _same_lengths(self) -> OpenRLHFRequest:
        if len(self.labels) != len(self.query):
            raise ValueError(f"labels has {len(self.labels)} entries but query has {len(self.query)}")
        if self.prompts is not None and len(self.prompts) != len(self.query):
            raise ValueError(f"prompts has {len(self.prompts)} entries but query has {len(self.query)}")
        return self


class OpenRLHFResponse(BaseModel):
    """``rewards`` = overall, ``scores`` = accuracy (what OpenRLHF filters groups on)."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class HealthResponse(BaseModel):
    status: str
    workers: int
    workers_alive: int
    reward_functions: list[str]
    default_reward_fn: str


class RewardFunctionInfo(BaseModel):
    name: str
    description: str


class RewardFunctionsResponse(BaseModel):
    default: str
    reward_functions: list[RewardFunctionInfo]


class ErrorResponse(BaseModel):
    detail: str
