"""docs/configuration.md, generated from the schema's help texts (config/schema.py and, for
the `method:` section, each method's config): `python -m gpart_ds.config --markdown`."""

from __future__ import annotations

import dataclasses

from omegaconf import MISSING

from .schema import RunConfig


def schema_markdown() -> str:
    """docs/configuration.md, generated from the schema's help texts (tests check the
    committed file equals this, so the docs cannot drift from the code)."""

    def default(f) -> str:
        if f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
            return "" if dataclasses.is_dataclass(v) else f"`{v}`"
        if f.default is MISSING or f.default == "???":
            return "**required**"
        return f"`{f.default}`" if f.default is not None else "`null`"

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "# Configuration reference",
        "",
        "Generated from the schema in `gpart_ds/config/schema.py` (the `method` keys: each method's "
        "`methods/<name>/config.py`) by `python -m gpart_ds.config --markdown`; do not "
        "edit by hand. A run is one YAML file plus `key.sub=value` overrides on the command line "
        "(`launch/train.py --config X.yaml train.lr=auto`); unknown keys, wrong types, bad values and "
        "duplicate keys are refused before anything runs, naming the file and line or the override.",
        "",
    ]
    top = [f for f in dataclasses.fields(RunConfig) if f.name not in ("config_file", "overrides")]
    for f in top:
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            lines += [f"## `{f.name}`: {f.metadata['help']}", "", "| key | default | meaning |", "|---|---|---|"]
            lines += [
                f"| `{f.name}.{g.name}` | {cell(default(g))} | {cell(g.metadata['help'])} |"
                for g in dataclasses.fields(sub)
            ]
            lines.append("")
    lines += ["## Top-level keys", "", "| key | default | meaning |", "|---|---|---|"]
    for f in top:
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if not dataclasses.is_dataclass(sub):
            lines.append(f"| `{f.name}` | {cell(default(f))} | {cell(f.metadata['help'])} |")
    return "\n".join(lines) + "\n"
