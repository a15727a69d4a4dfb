"""How a job's config is put together: YAML files, dotted CLI overrides and the preset, merged and
validated into a :class:`~trainer.core.config.schema.JobConfig`, with errors that name the field.

Resolution order (lowest to highest priority):
  1. the field defaults (the paper's runs, docs/algorithm.md "Defaults");
  2. the algorithm preset named by ``algo.name`` (``grpo``, ``dapo``, ``papo`` = PAPO-G, ``papo_d``),
     which fills every ``algo.*`` field the user did not set, then that preset's entry of the
     top-level ``algo_by_preset`` mapping, if the files or overrides give one (a config's own
     values per preset: ``algo_by_preset: {papo: {gamma: 0.01}}`` tunes PAPO-G and leaves
     ``algo.name=grpo`` a plain baseline);
  3. YAML files, in the order given (later files override earlier ones, dicts merge deeply);
  4. dotted overrides such as ``algo.gamma=0.01 rollout.n=8`` (values parsed as YAML scalars).
"""

from __future__ import annotations

import copy
import difflib
import logging
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError

import configs
from trainer.core.config.schema import (
    DEFAULT_ALGO,
    PRESETS,
    ConfigError,
    ConfigWarning,
    JobConfig,
    config_warnings,
)

logger = logging.getLogger(__name__)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"algo.gamma=0.01"`` -> (["algo", "gamma"], 0.01); the value is parsed as a YAML scalar."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {item!r}: expected dotted.key=value, e.g. algo.gamma=0.01"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError([f"override {item!r}: value is not valid YAML ({e.__class__.__name__})"]) from None
    return key.split("."), value


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(tree: dict, path: list[str], value: Any, item: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([f"override {item!r}: {'.'.join(path[: i + 1])} is a value, not a section"])
        node = child
    node[path[-1]] = value


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} does not exist"])
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"config file {str(p)!r} is not valid YAML: {e}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"config file {str(p)!r} must hold a mapping at the top, got {type(data).__name__}"])
    return data


def resolve_config(
    files: list[str | Path] = (), overrides: list[str] = (), *, base: dict | None = None, warn: bool = True
) -> JobConfig:
    """Merge ``base`` (a dict), YAML ``files`` and dotted ``overrides``, apply the preset, validate.

    Raises :class:`ConfigError` naming every offending field. Emits :class:`ConfigWarning`s for
    settings without effect (and logs them), unless ``warn`` is false.
    """
    tree: dict = copy.deepcopy(base) if base else {}
    for f in files:
        tree = _deep_merge(tree, load_yaml(f))
    for item in overrides:
        path, value = parse_override(item)
        _set_dotted(tree, path, value, item)
    algo = tree.get("algo", {})
    if not isinstance(algo, dict):
        raise ConfigError([f"algo: expected a section (mapping), got {algo!r}"])
    name = algo.get("name", DEFAULT_ALGO)
    if name not in PRESETS:
        raise ConfigError([f"algo.name: {name!r} is not a preset; allowed: {', '.join(PRESETS)}"])
    by_preset = _check_algo_by_preset(tree.pop("algo_by_preset", {}))
    tree["algo"] = {**PRESETS[name], **by_preset.get(name, {}), **algo}
    try:
        cfg = JobConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe_errors(e, tree)) from None
    if warn:
        for message in config_warnings(cfg):
            logger.warning(message)
            warnings.warn(message, ConfigWarning, stacklevel=2)
    return cfg


def _check_algo_by_preset(by_preset: Any) -> dict[str, dict]:
    """Validate ``algo_by_preset`` as a whole: preset names as keys, each entry a valid preset + values."""
    if not isinstance(by_preset, dict):
        raise ConfigError([f"algo_by_preset: expected a mapping of preset name -> algo values, got {by_preset!r}"])
    problems = []
    for preset, values in by_preset.items():
        where = f"algo_by_preset.{preset}"
        if preset not in PRESETS:
            problems.append(f"{where}: {preset!r} is not a preset; allowed: {', '.join(PRESETS)}")
        elif not isinstance(values, dict):
            problems.append(f"{where}: expected a mapping of algo values, got {values!r}")
        elif "name" in values:
            problems.append(f"{where}.name: an entry applies to its preset; it cannot rename it")
        else:
            tree = {"algo": {**PRESETS[preset], **values, "name": preset}}
            try:
                JobConfig.model_validate(tree)
            except ValidationError as e:
                for m in _describe_errors(e, tree):
                    m = m.replace("did you mean 'algo.", f"did you mean '{where}.")
                    problems.append(f"{where}.{m[5:]}" if m.startswith("algo.") else f"{where}: {m}")
    if problems:
        raise ConfigError(problems)
    return by_preset


def dump_config(cfg: JobConfig) -> str:
    """The resolved config as YAML, in field order (what ``papo train --print-config`` prints)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def _field_at(loc: tuple) -> tuple[type[BaseModel] | None, str | None, Any]:
    """Walk JobConfig's fields along ``loc``: (model owning the last key, last key, FieldInfo or None)."""
    model: Any = JobConfig
    for i, part in enumerate(loc):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return (model if isinstance(model, type) and issubclass(model, BaseModel) else None), str(part), None
        info = model.model_fields[part]
        if i == len(loc) - 1:
            return model, str(part), info
        model = info.annotation
    return None, None, None


def _is_section(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _allowed(info: Any) -> str:
    """The allowed values of a field, in words: its ``allowed`` schema note, Literal choices or numeric bounds."""
    extra = info.json_schema_extra
    if isinstance(extra, dict) and "allowed" in extra:
        return str(extra["allowed"])
    ann = info.annotation
    args = typing.get_args(ann)
    if typing.get_origin(ann) is typing.Union:  # Optional[X]
        ann = next(a for a in args if a is not type(None))
        args = typing.get_args(ann)
    if typing.get_origin(ann) is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    lo = hi = None
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge):
            lo = f"{m.ge} <= "
        elif isinstance(m, annotated_types.Gt):
            lo = f"{m.gt} < "
        elif isinstance(m, annotated_types.Le):
            hi = f" <= {m.le}"
        elif isinstance(m, annotated_types.Lt):
            hi = f" < {m.lt}"
    if lo or hi:
        return f"{lo or ''}x{hi or ''}"
    return getattr(ann, "__name__", str(ann))


def _describe_errors(err: ValidationError, tree: dict) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        owner, key, info = _field_at(loc)
        if e["type"] == "extra_forbidden":
            known = list(owner.model_fields) if owner else []
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            problems.append(f"{dotted}: unknown key{hint} (known keys here: {', '.join(known)})")
        elif not loc:  # a model-level (cross-field) validator of JobConfig
            problems.append(e["msg"].removeprefix("Value error, "))
        elif info is None or _is_section(info.annotation):  # a model-level validator of a section
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(msg if msg.startswith(dotted + ".") else f"{dotted}: {msg}")
        else:
            allowed = _allowed(info)
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{dotted}: {msg} (got {e.get('input')!r}; allowed: {allowed})")
    return problems


def configs_dir() -> Path:
    """The folder of shipped YAML configs (``configs/`` at the repository root, packaged as ``configs``)."""
    return Path(configs.__file__).parent


def shipped_configs() -> list[str]:
    """Names of the shipped configs: ``demo``, ``paper/qwen2_5_vl_7b``, ... (subfolders included)."""
    root = configs_dir()
    return sorted(q.relative_to(root).with_suffix("").as_posix() for q in root.rglob("*.yaml"))


def named_config(name: str) -> Path:
    """``demo`` -> the shipped ``configs/demo.yaml``, ``paper/papo`` -> ``configs/paper/papo.yaml``;
    a path to a file is returned unchanged."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    shipped = configs_dir() / f"{name}.yaml"
    if not shipped.is_file():
        raise ConfigError(
            [f"--config {name!r}: no such file, and not a shipped config ({', '.join(shipped_configs())})"]
        )
    return shipped
