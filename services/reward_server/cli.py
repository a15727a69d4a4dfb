"""``papo reward-server`` (also ``python -m services.reward_server.cli``): the argument parser and
the standalone uvicorn process that serves the app until interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from rewards import registry
from rewards.functions import DEFAULT_FORMAT_WEIGHT
from services.reward_server.api import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CHARS, DEFAULT_MAX_ITEMS, TOKEN_ENV
from services.reward_server.app import create_app
from services.reward_server.guard import resolve_token
from services.reward_server.serve import bind_socket, server_url

__all__ = ["build_parser", "cli_main"]

log = logging.getLogger(__name__)


def _user_function_arg(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not registry.is_user_spec(spec):
        raise argparse.ArgumentTypeError(f"expected NAME=path/to/file.py:fn, got {text!r}")
    return name, spec


def build_parser(prog: str = "papo reward-server") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve papo's rule-based rewards over HTTP (/v1/score, OpenRLHF /get_reward).",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: pick a free one; the URL is printed)")
    p.add_argument("--workers", type=int, default=2, help="grading worker processes (default 2)")
    p.add_argument("--token", default=None, help=f"required bearer token (default ${TOKEN_ENV}; none if unset)")
    p.add_argument("--fn", default="math", help="default reward function, a name or path/to/file.py:fn (default math)")
    p.add_argument(
        "--user-function",
        action="append",
        type=_user_function_arg,
        default=[],
        metavar="NAME=FILE.py:FN",
        help="register an operator reward function (repeatable)",
    )
    p.add_argument("--timeout-s", type=float, default=5.0, help="per-item grading timeout in seconds (default 5)")
    p.add_argument("--deadline-s", type=float, default=120.0, help="per-request deadline in seconds (default 120)")
    p.add_argument("--format-weight", type=float, default=DEFAULT_FORMAT_WEIGHT, help="w in (1-w)*acc + w*format")
    p.add_argument("--max-items", type=int, default=DEFAULT_MAX_ITEMS, help="items per request")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="characters per string")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="request body size")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def cli_main(argv: list[str]) -> int:
    """``papo reward-server --host --port --workers --token ...``: serve until interrupted."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = resolve_token(args.token)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: anyone who can reach it can use it (set %s)", args.host, TOKEN_ENV)
    try:
        app = create_app(
            fn=args.fn,
            workers=args.workers,
            timeout_s=args.timeout_s,
            format_weight=args.format_weight,
            token=token or "",
            user_functions=dict(args.user_function),
            deadline_s=args.deadline_s,
            max_items=args.max_items,
            max_chars=args.max_chars,
            max_body_bytes=args.max_body_bytes,
        )
        sock = bind_socket(args.host, args.port)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        print(f"papo reward-server: {exc}", file=sys.stderr)
        return 2
    url = server_url(args.host, sock.getsockname()[1])
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "debug", lifespan="on")
    server = uvicorn.Server(config)
    print(f"papo reward-server: {url} (reward functions: {', '.join(registry.available())})", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn has already shut down gracefully (grading pool closed) and re-raises Ctrl-C.
        pass
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
