"""The reward server: one FastAPI app, served standalone (uvicorn) or as a Ray Serve deployment.

``api`` (the HTTP contract's models and limits), ``guard`` (token, body limit, request metrics
middleware), ``metrics`` (Prometheus), ``app`` (`create_app`), ``serve`` (`LocalRewardServer`,
`start_ray_serve` / `stop_ray_serve`), ``cli`` (``papo reward-server``). docs/reward-server.md
describes the API.
"""

from services.reward_server.api import TOKEN_ENV
from services.reward_server.app import create_app
from services.reward_server.serve import LocalRewardServer, start_ray_serve, stop_ray_serve

__all__ = ["TOKEN_ENV", "create_app", "LocalRewardServer", "start_ray_serve", "stop_ray_serve"]
