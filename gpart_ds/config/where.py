"""Where a configuration key came from, for error messages: 'file:line (key)' or
'command-line override (key)'; ConfigError, and `need`, the check every validation of a
config (a method's among them: methods.base.Need) is handed."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import UserError


class ConfigError(UserError):
    """A configuration problem a user can fix: says which key, and where."""


def _yaml_lines(path: Path) -> dict[str, int]:
    """Dotted key -> 1-based line number, from the YAML node tree."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        walk(yaml.compose(path.read_text()), "")
    except yaml.YAMLError:
        pass
    return lines


class Where:
    """Turns a dotted key into 'file:line (key)' or 'command-line override (key)'."""

    def __init__(self, path: Path | None, overrides: list[str]):
        self.path = path
        self.lines = _yaml_lines(path) if path else {}
        self.overridden = {o.split("=", 1)[0].strip() for o in overrides}

    def __call__(self, key: str) -> str:
        for o in self.overridden:  # the key itself, or a section or sub-key of an override
            if o == key or o.startswith(key + ".") or key.startswith(o + "."):
                return f"command-line override {o!r}"
        probe = key
        while probe:
            if probe in self.lines:
                return f"{self.path}:{self.lines[probe]} ({key!r})"
            probe = probe.rpartition(".")[0]
        return f"{self.path or 'config'} ({key!r})"


def where_for(cfg) -> Where:
    """Locator of keys of a loaded config: 'file:line (key)' for error messages."""
    return Where(Path(cfg.config_file) if cfg.config_file else None, list(cfg.overrides))


def need_for(where: Where):
    """`need(condition, "section.key", message)`: a ConfigError naming the key's file and
    line unless the condition holds (what every check of a config, a method's among them
    (methods.base.Need), is handed)."""

    def need(cond, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{where(key)}: {msg}")

    return need
