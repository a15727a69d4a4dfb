"""The ``papo`` command line: ``train``, ``eval``, ``reward-server``, ``demo-assets``.

This module only parses arguments and dispatches; each command's work lives in the module that
owns it (``trainer.driver``, ``services.reward_server``, ``trainer.demo``). Commands whose module
brings its own argument parser (``reward-server``, ``demo-assets``) receive the remaining argv.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Optional

from trainer.config import ConfigError, dump_config, named_config, resolve_config

# command -> (module owning it, one-line help). Delegated commands parse their own arguments.
DELEGATED: dict[str, tuple[str, str]] = {
    "reward-server": ("services.reward_server", "serve the rule-based reward HTTP API (uvicorn)"),
    "demo-assets": ("trainer.demo", "write the tiny Qwen2.5-VL demo model and the synthetic VQA dataset"),
}


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train with PAPO/GRPO/DAPO (no arguments: the embedded demo)",
        description="Resolve a job config (shipped name or YAML file, then dotted overrides) and train.",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. algo.gamma=0.01")
    p.add_argument("--config", "-c", action="append", default=None, metavar="NAME|FILE",
                   help="shipped config name (demo) or YAML file; repeat to merge (default: demo)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (greedy, avg@k, black-image accuracy)")
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="papo", description="Perception-Aware Policy Optimization for vision-language models, on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)
    _eval_parser(sub)
    for name, (_, help_) in DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    cfg = resolve_config([named_config(c) for c in (args.config or ["demo"])], list(args.overrides))
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    driver = _load_optional("trainer.driver", "the training step (trainer/driver.py)")
    if driver is None:
        return 1
    return int(driver.train(cfg) or 0)


def cmd_eval(args: argparse.Namespace) -> int:
    driver = _load_optional("trainer.driver", "evaluation (trainer/driver.py)")
    if driver is None or not hasattr(driver, "evaluate_checkpoint"):
        print("papo eval: evaluating a saved checkpoint is not part of this build yet; `papo train` evaluates "
              "every trainer.eval_every steps", file=sys.stderr)
        return 1
    return int(driver.evaluate_checkpoint(args.checkpoint, args.overrides) or 0)


def _load_optional(module: str, what: str):
    """Import a module that a later milestone adds; say so plainly instead of pretending to run."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        print(f"papo: {what} is not part of this build yet ({module} is missing). This build can resolve and "
              "print configs (papo train --print-config), build the demo assets (papo demo-assets DIR) and "
              "serve rewards (papo reward-server).", file=sys.stderr)
        return None


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"train": cmd_train, "eval": cmd_eval}


def main(argv: Optional[list[str]] = None) -> int:
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
