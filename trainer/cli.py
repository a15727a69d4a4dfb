"""The ``papo`` command line: ``train``, ``eval``, ``reward-server``, ``demo-assets``.

This module only parses arguments and dispatches; each command's work lives in the module that
owns it (``trainer.driver``, ``services.reward_server.cli``, ``trainer.demo``). Commands whose module
brings its own argument parser (``reward-server``, ``demo-assets``) receive the remaining argv.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from trainer.core.config import ConfigError, dump_config, named_config, resolve_config

# command -> (module owning it, one-line help). Delegated commands parse their own arguments.
DELEGATED: dict[str, tuple[str, str]] = {
    "reward-server": ("services.reward_server.cli", "serve the rule-based reward HTTP API (uvicorn)"),
    "demo-assets": ("trainer.demo", "write the tiny Qwen2.5-VL demo model and the synthetic VQA dataset"),
    "submit": ("trainer.submit", "submit `papo train` as a Ray job to a running cluster (--wait follows it)"),
}


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train with PAPO/GRPO/DAPO (no arguments: the embedded demo)",
        description="Resolve a job config (shipped name or YAML file, then dotted overrides) and train.",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. algo.gamma=0.01")
    p.add_argument(
        "--config",
        "-c",
        action="append",
        default=None,
        metavar="NAME|FILE",
        help="shipped config name (demo) or YAML file; repeat to merge (default: demo)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue a run from its newest checkpoint (DIR: runs/<name> or one checkpoint folder); "
        "without --config the run's own config.yaml is used, overrides apply on top",
    )


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (greedy, black- and masked-image accuracy, avg@k)",
        description="Evaluate a checkpoint in-process (local rollout worker, in-process grading; no Ray): greedy "
        "accuracy, accuracy with black and with training-style masked images, their gaps, and avg@k / "
        "pass@k. Prints a markdown table and writes eval.json + eval.md (default: in the checkpoint).",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="model folder: runs/<name>/checkpoints/step_XXXXXX or any HF model folder",
    )
    p.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="FILE",
        help="dataset file or folder (its validation split); repeat for one table row each "
        "(default: the config's validation split)",
    )
    p.add_argument("--k", type=int, default=8, help="samples per prompt for avg@k / pass@k (0: none; default 8)")
    p.add_argument(
        "--config",
        "-c",
        action="append",
        default=None,
        metavar="NAME|FILE",
        help="shipped config name or YAML file (default: the run's config.yaml beside the checkpoint, else demo)",
    )
    p.add_argument("--out", metavar="PATH", help="output folder, or a .json/.md path (default: the checkpoint folder)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N prompts of each dataset")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="papo", description="Perception-Aware Policy Optimization for vision-language models, on Ray."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)
    _eval_parser(sub)
    for name, (_, help_) in DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    if args.config:
        files = [named_config(c) for c in args.config]
    elif args.resume:
        files = [_run_config(Path(args.resume))]
    else:
        files = [named_config("demo")]
    cfg = resolve_config(files, list(args.overrides))
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from trainer import driver  # imported here: --print-config must not pay for torch and Ray

    return int(driver.train(cfg, resume=args.resume) or 0)


def _run_config(resume: Path) -> Path:
    """The ``config.yaml`` of the run that ``--resume`` points into (the run folder or one of its checkpoints)."""
    if not resume.exists():
        raise ConfigError([f"--resume {resume}: no such run directory or checkpoint"])
    for folder in (resume, resume.parent, resume.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise ConfigError([f"--resume {resume}: no config.yaml in it or its parent run directory; pass --config"])


def cmd_eval(args: argparse.Namespace) -> int:
    # imported here, like the driver: `papo --help` and config errors must not pay for torch and vLLM
    from trainer.evaluate import (
        EvalError,
        NothingServed,
        check_checkpoint,
        evaluate_checkpoint,
        report_paths,
        write_report,
    )

    try:
        report_paths(check_checkpoint(args.checkpoint), args.out)  # a read-only destination fails now, not later
        report = evaluate_checkpoint(
            args.checkpoint,
            data=args.data or [],
            k=args.k,
            config=args.config,
            overrides=list(args.overrides),
            limit=args.limit,
        )
    except EvalError as e:
        print(f"papo eval: {e}", file=sys.stderr)
        return 2
    except NothingServed as e:
        print(f"papo eval: {e}", file=sys.stderr)
        return 1
    print(report.to_markdown(), end="")
    json_path, md_path = write_report(report, args.out)
    print(f"wrote {json_path} and {md_path}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"train": cmd_train, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per reward request drowns the step line
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        return int(module.cli_main(argv[1:]) or 0)
    parser = build_parser()
    # Overrides may stand anywhere among the options (argparse's nargs="*" positional only takes
    # one contiguous run): collect the stray KEY=VALUE words that parse_known_args leaves over.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if "=" in e and not e.startswith("-")]
    unknown = [e for e in extra if e not in stray]
    if unknown or (stray and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or stray)}")
    if stray:
        args.overrides = list(args.overrides) + stray
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"papo {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
