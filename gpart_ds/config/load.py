"""Loading a run configuration: one YAML file plus `key.sub=value` overrides, merged onto
the schema (config/schema.py) and type-checked, then checked (config/checks.py) before
anything expensive happens; the DeepSpeed section read from its file. Every error names
the key and, where it came from a file, the file and line."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checks import check_paths, validate_values
from .schema import RunConfig
from .where import ConfigError, Where

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A path as given, or a bare name looked up in configs/ (with or without .yaml)."""
    p = Path(name)
    if p.is_file():
        return p.resolve()
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f"config file {str(name)!r} not found (also looked in {CONFIG_DIR})")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last:
    a second `lr:` silently winning, a second `method:` block replacing the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(
                    f"{self.name}:{key_node.start_mark.line + 1}: duplicate key {key!r} (first at "
                    f"line {seen[key]}); YAML would silently keep the last"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: Path):
    """A YAML file's content; syntax errors and duplicate keys name the file and line."""
    text = path.read_text()
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    finally:
        loader.dispose()


_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _check_overrides(overrides: list[str]) -> None:
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if "=" not in o or not _OVERRIDE_KEY.match(key):
            raise ConfigError(
                f"command-line override {o!r} must look like key.sub=value (dotted names of letters, digits and _)"
            )


def _has_key(schema, key: str) -> bool:
    node = schema
    for part in key.split("."):
        if not OmegaConf.is_dict(node) or part not in node.keys():
            return False
        node = node._get_node(part)
    return True


def _sections(schema) -> set[str]:
    """Dotted names of the schema's sections (keys whose value is a mapping of keys)."""
    out = set()

    def walk(node, prefix):
        for k in node.keys():
            sub = node._get_node(k)
            if OmegaConf.is_dict(sub) and OmegaConf.get_type(sub) is not dict:
                out.add(prefix + k)
                walk(sub, prefix + k + ".")

    walk(schema, "")
    return out


def _check_sections(content: dict, sections: set[str], where) -> None:
    """A section given as a scalar or list (`train: 5`) is named as such, not as a merge error."""

    def walk(tree: dict, prefix: str):
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if key in sections:
                if not isinstance(v, dict):
                    raise ConfigError(
                        f"{where(key)}: {key!r} is a section: it must be a mapping of its keys "
                        f"(e.g. {key}.<key>: value), got {type(v).__name__} {v!r}"[:400]
                    )
                walk(v, key + ".")

    walk(content, "")


def _unknown_key(cfg_schema, key: str) -> str:
    """'train.lrr is not a key; did you mean train.lr?' for an unknown dotted key."""
    import difflib

    parts, node, known = key.split("."), cfg_schema, []
    for i, part in enumerate(parts):
        if not OmegaConf.is_dict(node) or part not in node.keys():
            known = list(node.keys()) if OmegaConf.is_dict(node) else []
            close = difflib.get_close_matches(part, known, n=1) or [k for k in known if k.lower() == part.lower()]
            prefix = ".".join(parts[:i])
            hint = f"; did you mean {'.'.join([prefix, close[0]]).lstrip('.')!r}?" if close else ""
            return f"unknown key {'.'.join(parts[: i + 1])!r}{hint}"
        node = node._get_node(part)
    return f"bad key {key!r}"


def load_config(
    path: str | os.PathLike | None, overrides: list[str] | None = None, check_files: bool = True
) -> DictConfig:
    """Load, merge overrides, type-check against the schema and validate values."""
    overrides = list(overrides or [])
    file = resolve_config_path(path) if path is not None else None
    where = Where(file, overrides)
    schema = OmegaConf.structured(RunConfig)
    content = (read_yaml(file) if file else None) or {}
    if not isinstance(content, dict):
        raise ConfigError(
            f"{file}: the top level must be a mapping of sections (method:, model:, ...), "
            f"got a {type(content).__name__}"
        )
    _check_overrides(overrides)
    try:
        raw = OmegaConf.create(content)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{file}: {str(exc).splitlines()[0]}") from None
    for o in overrides:  # each value parsed alone, so a bad one is named
        try:
            OmegaConf.from_dotlist([o])
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            raise ConfigError(
                f"command-line override {o!r}: the value is not valid YAML ({str(exc).splitlines()[0]})"
            ) from None
    dot = OmegaConf.from_dotlist(overrides)
    sections = _sections(schema)
    for o in overrides:  # unknown override keys, named as such (not blamed on the file)
        key = o.split("=", 1)[0].strip()
        if not _has_key(schema, key):
            raise ConfigError(f"command-line override {key!r}: {_unknown_key(schema, key)}")
        if key in sections:
            raise ConfigError(
                f"command-line override {o!r}: {key!r} is a section; set one of its keys "
                f"instead (e.g. {key}.<key>=value)"
            )
    _check_sections(content, sections, where)
    try:
        cfg = OmegaConf.merge(schema, raw, dot)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        if "Key '" in msg and "not in" in msg:
            msg = _unknown_key(schema, key)
        raise ConfigError(f"{where(key)}: {msg}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{file or 'config'}: required keys missing: {', '.join(missing)}")
    cfg.config_file = str(file) if file else None
    cfg.overrides = overrides
    # A hub-style name already in the Hugging Face cache becomes its snapshot folder, so
    # every later reader (tokenizer, sharded load, export, checkpoints) sees one folder.
    from ..hub import resolve

    cfg.model.path = resolve(cfg.model.path)
    validate_values(cfg, where)
    base_dir = file.parent if file else Path.cwd()
    cfg.deepspeed = _load_deepspeed(cfg.deepspeed, base_dir, where)
    if check_files:
        check_paths(cfg, where)
    return cfg


def _deepspeed_path(value: str, base_dir: Path) -> Path:
    """Where a `deepspeed:` file name points: relative to the YAML file, else as given."""
    p = Path(value)
    if not p.is_absolute():
        p = (base_dir / p) if (base_dir / p).exists() else Path(value)
    return p


def _json_object(pairs):
    """A JSON object that refuses a key given twice (json would keep the last in silence)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"duplicate key {key!r}; JSON would silently keep the last")
        out[key] = value
    return out


def _second_line(path: Path, exc: ConfigError) -> str:
    """':LINE' of a duplicate key's second occurrence in a JSON file ('' if not found)."""
    m = re.search(r"duplicate key '([^']*)'", str(exc))
    if not m:
        return ""
    text = path.read_text()
    hits = [text.count("\n", 0, h.start()) + 1 for h in re.finditer(re.escape(json.dumps(m.group(1))) + r"\s*:", text)]
    return f":{hits[1]}" if len(hits) > 1 else ""


def _load_deepspeed(value, base_dir: Path, where: Where) -> dict:
    """The DeepSpeed config as a dict: inline mapping, or JSON path relative to the YAML."""
    if value is None:
        return {"zero_optimization": {"stage": 3}}
    if isinstance(value, str):
        p = _deepspeed_path(value, base_dir)
        if not p.is_file():
            raise ConfigError(
                f"{where('deepspeed')}: DeepSpeed config {value!r} not found (looked at {base_dir / value})"
            )
        try:
            content = json.loads(p.read_text(), object_pairs_hook=_json_object)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}:{exc.lineno}: DeepSpeed config is not valid JSON: {exc.msg}") from None
        except ConfigError as exc:
            raise ConfigError(f"{p}{_second_line(p, exc)}: DeepSpeed config: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: DeepSpeed config is not UTF-8 text ({exc.reason})") from None
        if not isinstance(content, dict):
            raise ConfigError(
                f"{p}: DeepSpeed config: the top level must be a JSON object of settings "
                f'({{"zero_optimization": ...}}), got a {type(content).__name__}'
            )
        return content
    if OmegaConf.is_dict(value):
        return OmegaConf.to_container(value, resolve=True)
    raise ConfigError(f"{where('deepspeed')}: must be a JSON file path or a mapping")


def deepspeed_file(cfg: DictConfig) -> str | None:
    """The DeepSpeed JSON file a loaded config read (None: an inline mapping or the default),
    for messages: the loader keeps only its content. Read again from the override or the
    YAML file, so the config itself (and every run's identity) carries nothing new."""
    value = None
    for o in cfg.overrides or []:
        key, _, raw = o.partition("=")
        if key.strip() == "deepspeed":
            value = raw.strip()
    base = Path(cfg.config_file).parent if cfg.config_file else Path.cwd()
    if value is None and cfg.config_file:
        try:
            content = read_yaml(Path(cfg.config_file))
        except (OSError, ConfigError):
            return None
        value = content.get("deepspeed") if isinstance(content, dict) else None
    return str(_deepspeed_path(value, base)) if isinstance(value, str) and value else None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
