"""``papo submit``: run ``papo train`` as a Ray job on a running cluster (local, compose, KubeRay).

This module owns the submission path: it resolves and validates the job config on the client
(so a typo fails here, before anything is uploaded), ships the resolved YAML to the cluster in
the job's ``runtime_env`` (with the repository as ``working_dir`` unless the cluster's image
already holds papo), authenticates against a token-auth cluster (Ray >= 2.52,
``RAY_AUTH_MODE=token``), and optionally waits for the job, printing status lines, exiting with
a code that says how it ended and printing the tail of the job's log on failure.

It talks to the cluster only through Ray's public job SDK (``ray.job_submission``).

Exit codes: 0 submitted (no ``--wait``) or SUCCEEDED; 1 FAILED; 2 usage/config error or the
cluster refused the submission; 3 STOPPED; 4 the job's end is unknown: ``--timeout`` reached (the
job keeps running) or the job API was lost while waiting; 130 interrupted while waiting (the job
keeps running).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainer.core.config import ConfigError, JobConfig, dump_config, named_config, resolve_config

#: Environment variable that carries the resolved job config (YAML) to the job's entrypoint.
CONFIG_ENV = "PAPO_JOB_CONFIG"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
#: Never uploaded with the working_dir (Ray also honours the repository's .gitignore).
DEFAULT_EXCLUDES = (
    ".git",
    ".venv",
    "runs",
    "**/__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".hypothesis",
    "bench/results",
    "demo-assets",
    "*.egg-info",
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
_EXIT_BY_STATUS = {"SUCCEEDED": EXIT_OK, "FAILED": EXIT_FAILED, "STOPPED": EXIT_STOPPED}


class SubmitError(RuntimeError):
    """A submission that cannot proceed; the message names what is wrong (address, file, token)."""


class SubmitOptions(BaseModel):
    """Everything ``papo submit`` needs; the CLI builds one, Python callers may too."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(
        None, description="job API (dashboard) URL; default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, " + DEFAULT_ADDRESS
    )
    configs: list[str] = Field(default_factory=lambda: ["demo"], description="config names or YAML files, merged")
    overrides: list[str] = Field(default_factory=list, description="dotted KEY=VALUE overrides")
    working_dir: Path | None = Field(
        None,
        description="directory uploaded as the job's working_dir (its code shadows the installed papo); "
        "None: run the papo installed on the cluster (image)",
    )
    excludes: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables for the job")
    token_file: Path | None = Field(None, description="Ray auth token file (else RAY_AUTH_TOKEN, ...)")
    submission_id: str | None = None
    papo_command: str = Field(
        "papo", min_length=1, description="how the cluster runs papo, e.g. 'python -m trainer.cli'"
    )
    entrypoint_num_cpus: float = Field(0.0, ge=0, description="CPUs reserved for the driver process")
    wait: bool = False
    poll_s: float = Field(2.0, gt=0)
    timeout_s: float | None = Field(None, gt=0, description="stop waiting (not the job) after this long")
    follow_logs: bool = Field(False, description="print the job's new log lines while waiting")
    tail_lines: int = Field(60, ge=0, description="log lines printed when the job does not succeed")

    @field_validator("env")
    @classmethod
    def _env_not_reserved(cls, env: dict[str, str]) -> dict[str, str]:
        if CONFIG_ENV in env:
            raise ValueError(f"{CONFIG_ENV} is set by papo submit from --config/overrides; do not pass it in env")
        return env


# ---- pieces ------------------------------------------------------------------------------------


def repo_root() -> Path | None:
    """The source checkout this papo runs from (holds pyproject.toml and trainer/), or None if installed."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "trainer" / "cli.py").is_file() else None


def resolve_address(address: str | None) -> str:
    """The job API URL: the explicit address, else $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS, else localhost.

    A bare ``host:port`` is taken as the dashboard's HTTP address (Ray itself would read it as a
    GCS address and need to join the cluster to look the dashboard up).
    """
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if addr == "auto":
        raise SubmitError("address 'auto' cannot be submitted to; give the dashboard URL, e.g. " + DEFAULT_ADDRESS)
    if "://" not in addr:
        addr = "http://" + addr
    if not addr.startswith(("http://", "https://")):
        raise SubmitError(
            f"address {addr!r}: papo submit talks to the job API over HTTP(S), "
            f"e.g. {DEFAULT_ADDRESS} (ray:// client addresses are not supported)"
        )
    return addr.rstrip("/")


def resolve_token(token_file: Path | None) -> str | None:
    """The Ray auth token to send, in Ray's own precedence (docs: "Token Sources and Precedence").

    An explicit ``token_file`` wins; then ``RAY_AUTH_TOKEN``; then the file at
    ``RAY_AUTH_TOKEN_PATH``; then ``~/.ray/auth_token``, but only with ``RAY_AUTH_MODE=token``
    (as Ray's own CLI does) so a local token is not sent to clusters that did not ask for one.
    """
    path: Path | None = None
    if token_file is not None:
        path = Path(token_file).expanduser()
        what = f"--token-file {str(path)!r}"
    elif os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        what = f"RAY_AUTH_TOKEN_PATH={str(path)!r}"
    elif os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        path = Path.home() / ".ray" / "auth_token"
        what = f"RAY_AUTH_MODE=token, but the default token file {str(path)!r}"
        if not path.is_file():
            raise SubmitError(f"{what} does not exist (copy the cluster's token there, or pass --token-file)")
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise SubmitError(f"{what}: cannot read the token file: {e.strerror or e}") from None
    if not token:
        raise SubmitError(f"{what}: the token file is empty")
    return token


def resolve_job_config(configs: list[str], overrides: list[str]) -> JobConfig:
    """Resolve and validate locally, exactly as ``papo train`` would (raises ConfigError)."""
    return resolve_config([named_config(c) for c in configs], list(overrides))


def build_entrypoint(papo_command: str) -> str:
    """The job's shell command: write the shipped config to a private temp file and train on it.

    The file lives outside the working_dir because Ray shares one unpacked working_dir between
    jobs with the same content.
    """
    return (
        f'cfg=$(mktemp "${{TMPDIR:-/tmp}}/papo-job-XXXXXX.yaml") && trap \'rm -f "$cfg"\' EXIT && '
        f'printf "%s" "${CONFIG_ENV}" > "$cfg" && {papo_command} train --config "$cfg"'
    )


def build_runtime_env(opts: SubmitOptions, config_yaml: str) -> dict[str, Any]:
    """The job's runtime_env: config and env vars, plus the working_dir upload if any."""
    env = dict(opts.env)
    env[CONFIG_ENV] = config_yaml
    runtime_env: dict[str, Any] = {"env_vars": env}
    if opts.working_dir is not None:
        wd = Path(opts.working_dir).expanduser().resolve()
        if not wd.is_dir():
            raise SubmitError(f"--working-dir {str(wd)!r} is not a directory")
        runtime_env["working_dir"] = str(wd)
        runtime_env["excludes"] = list(opts.excludes)
    return runtime_env


@contextlib.contextmanager
def _env_removed(*names: str) -> Iterator[None]:
    """Hide env vars for a moment: Ray's client lets RAY_ADDRESS override an explicit address."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, token: str | None) -> Any:
    """A JobSubmissionClient for ``address`` (checked reachable); errors name the address."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # An explicit Authorization header makes Ray's client skip its own token lookup (which reads
    # process-global state fixed at import), so the token chosen here is the one sent.
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _env_removed("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            return JobSubmissionClient(address, headers=headers)
    except ConnectionError as e:
        raise SubmitError(
            f"cannot reach the Ray job API at {address} (is the head running and its dashboard port exposed?): {e}"
        ) from None
    except AuthenticationError as e:
        what = "refused the token sent" if token else "needs an auth token"
        raise SubmitError(f"the Ray job API at {address} {what}: {_auth_hint(str(e), token)}") from None
    except RuntimeError as e:
        raise SubmitError(f"the Ray job API at {address} refused the connection: {_auth_hint(str(e), token)}") from None


def _auth_hint(message: str, token: str | None) -> str:
    first = message.strip().splitlines()[0] if message.strip() else message
    if "401" in message or "Missing authentication token" in message:
        # Ray's own text goes on about RAY_AUTH_MODE of this process, which papo submit does not need.
        return (
            first + "\n(the cluster uses token auth: pass --token-file, or set RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH, or RAY_AUTH_MODE=token with the token in ~/.ray/auth_token)"
        )
    if "403" in message or "Invalid authentication token" in message:
        return first + ("\n(the token sent does not match the cluster's)" if token else "")
    return message.strip()


def submit(opts: SubmitOptions, *, client: Any = None, out: TextIO = sys.stdout) -> tuple[Any, str]:
    """Validate the config, submit the job; return (client, submission id)."""
    from ray.exceptions import AuthenticationError

    cfg = resolve_job_config(opts.configs, opts.overrides)
    runtime_env = build_runtime_env(opts, dump_config(cfg))
    address = resolve_address(opts.address)
    if client is None:
        client = connect(address, resolve_token(opts.token_file))
    try:
        job_id = client.submit_job(
            entrypoint=build_entrypoint(opts.papo_command),
            runtime_env=runtime_env,
            submission_id=opts.submission_id,
            entrypoint_num_cpus=opts.entrypoint_num_cpus or None,
            metadata={"papo.run": cfg.trainer.name, "papo.algo": cfg.algo.name},
        )
    except ConnectionError as e:
        raise SubmitError(f"lost the Ray job API at {address} while submitting: {e}") from None
    except AuthenticationError as e:
        raise SubmitError(f"the Ray job API at {address} refused the token: {_auth_hint(str(e), 'sent')}") from None
    except RuntimeError as e:
        raise SubmitError(f"the Ray job API at {address} rejected the job: {_auth_hint(str(e), None)}") from None
    where = "working_dir " + runtime_env["working_dir"] if "working_dir" in runtime_env else "the cluster's papo"
    print(
        f"papo submit: job {job_id} submitted to {address} (run {cfg.trainer.name!r}, algo {cfg.algo.name}, "
        f"{cfg.trainer.total_steps} steps, code: {where})",
        file=out,
        flush=True,
    )
    return client, job_id


def wait_for_job(
    client: Any,
    job_id: str,
    *,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
    follow_logs: bool = False,
    out: TextIO = sys.stdout,
) -> str | None:
    """Poll until the job ends; print a line per status change. Return the final status, None on timeout."""
    t0 = time.monotonic()
    last_status: str | None = None
    printed = 0
    while True:
        status = str(client.get_job_status(job_id))
        if follow_logs:
            logs = client.get_job_logs(job_id)
            if len(logs) > printed:
                out.write(logs[printed:])
                out.flush()
                printed = len(logs)
        if status != last_status:
            print(f"papo submit: job {job_id} {status} ({time.monotonic() - t0:.0f} s)", file=out, flush=True)
            last_status = status
        if status in _EXIT_BY_STATUS:
            return status
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            return None
        time.sleep(poll_s)


def log_tail(client: Any, job_id: str, lines: int) -> str:
    """The last ``lines`` lines of the job's log (what the driver printed)."""
    text = client.get_job_logs(job_id)
    return "\n".join(text.rstrip("\n").splitlines()[-lines:]) if lines else ""


def run(opts: SubmitOptions, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Submit, and with ``opts.wait`` follow the job to its end; return the exit code."""
    client, job_id = submit(opts, out=out)
    if not opts.wait:
        address = resolve_address(opts.address)
        print(
            f"papo submit: follow it with `ray job logs --address {address} -f {job_id}`; "
            f"status: `ray job status --address {address} {job_id}`",
            file=out,
        )
        return EXIT_OK
    try:
        status = wait_for_job(
            client, job_id, poll_s=opts.poll_s, timeout_s=opts.timeout_s, follow_logs=opts.follow_logs, out=out
        )
    except KeyboardInterrupt:
        print(f"papo submit: stopped waiting; job {job_id} keeps running (ray job stop {job_id})", file=err)
        return EXIT_INTERRUPTED
    except (ConnectionError, RuntimeError) as e:
        # The head went away (or stopped answering) mid-run: the job's end is unknown here.
        print(
            f"papo submit: lost the Ray job API at {resolve_address(opts.address)} while waiting for job {job_id}: {e}",
            file=err,
        )
        return EXIT_TIMEOUT
    if status is None:
        print(
            f"papo submit: job {job_id} still {client.get_job_status(job_id)} after {opts.timeout_s:.0f} s; "
            "it keeps running",
            file=err,
        )
        return EXIT_TIMEOUT
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        print(f"papo submit: job {job_id} {status}: {getattr(info, 'message', None) or 'no message'}", file=err)
        if opts.tail_lines and not opts.follow_logs:
            print(
                f"---- last {opts.tail_lines} log lines of {job_id} ----\n{log_tail(client, job_id, opts.tail_lines)}"
                "\n----",
                file=err,
            )
    return _EXIT_BY_STATUS[status]


# ---- command line ------------------------------------------------------------------------------


def _env_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser(prog: str = "papo submit") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Submit `papo train` as a Ray job to a running Ray cluster (job API / dashboard).",
        epilog="Exit codes: 0 submitted or SUCCEEDED, 1 FAILED, 2 usage/config/submission error, 3 STOPPED, "
        "4 --timeout reached or job API lost while waiting, 130 interrupted.",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. trainer.total_steps=2"
    )
    p.add_argument("--address", help=f"job API URL (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, {DEFAULT_ADDRESS})")
    p.add_argument(
        "--config",
        "-c",
        action="append",
        default=None,
        metavar="NAME|FILE",
        help="shipped config name or YAML file; repeat to merge (default: demo)",
    )
    code = p.add_mutually_exclusive_group()
    code.add_argument(
        "--working-dir",
        type=Path,
        metavar="DIR",
        help="upload DIR as the job's working_dir (default: this papo checkout, if it is one)",
    )
    code.add_argument(
        "--no-upload",
        action="store_true",
        help="upload no code: run the papo installed on the cluster (container images)",
    )
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="more working_dir excludes")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        type=_env_arg,
        metavar="KEY=VALUE",
        help="environment variable for the job (repeatable)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="Ray auth token file (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token "
        "with RAY_AUTH_MODE=token)",
    )
    p.add_argument("--submission-id", help="job id to use (default: generated by Ray)")
    p.add_argument("--papo-command", default="papo", help="command that runs papo on the cluster (default: papo)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0.0, help="CPUs reserved for the driver (default 0)")
    p.add_argument("--wait", action="store_true", help="wait for the job; exit code by its final status")
    p.add_argument("--follow", action="store_true", help="with --wait: print the job's log as it grows")
    p.add_argument("--poll", type=float, default=2.0, metavar="S", help="seconds between status polls (default 2)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="with --wait: give up waiting after S s")
    p.add_argument("--tail", type=int, default=60, metavar="N", help="log lines shown when the job fails (default 60)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config that would be sent, and exit")
    return p


def options_from_args(args: argparse.Namespace) -> SubmitOptions:
    if args.no_upload:
        working_dir = None
    elif args.working_dir is not None:
        working_dir = args.working_dir
    else:
        working_dir = repo_root()
    return SubmitOptions(
        address=args.address,
        configs=args.config or ["demo"],
        overrides=list(args.overrides),
        working_dir=working_dir,
        excludes=list(DEFAULT_EXCLUDES) + list(args.exclude),
        env=dict(args.env),
        token_file=args.token_file,
        submission_id=args.submission_id,
        papo_command=args.papo_command,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        wait=args.wait,
        poll_s=args.poll,
        timeout_s=args.timeout,
        follow_logs=args.follow,
        tail_lines=args.tail,
    )


def cli_main(argv: list[str] | None = None) -> int:
    """``papo submit ...``; returns the exit code (see the module docstring)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Overrides may stand among the options (as in `papo train`): nargs="*" takes one run only.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if "=" in e and not e.startswith("-")]
    if len(stray) != len(extra):
        parser.error(f"unrecognized arguments: {' '.join(e for e in extra if e not in stray)}")
    args.overrides = list(args.overrides) + stray
    try:
        if args.print_config:
            print(dump_config(resolve_job_config(args.config or ["demo"], args.overrides)), end="")
            return EXIT_OK
        return run(options_from_args(args))
    except ConfigError as e:
        print(f"papo submit: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (SubmitError, ValueError) as e:
        print(f"papo submit: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(cli_main())
