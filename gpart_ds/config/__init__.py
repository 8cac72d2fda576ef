"""The run configuration, one job per module:

    schema.py   the sections, their keys, defaults and help texts; `method:` assembled from
                the methods' own configs (methods/<name>/config.py)
    where.py    where a key came from (file:line or the override), ConfigError, need_for
    load.py     YAML + overrides -> a checked DictConfig (load_config); the DeepSpeed section
    checks.py   the values' checks, the files a run reads, method keys the method does not read
    values.py   what a loaded config implies: train.lr: auto's rate, the export folder
    docs.py     docs/configuration.md from the schema (python -m gpart_ds.config --markdown)

The names callers use are importable from `gpart_ds.config` itself.
"""

from .checks import check_paths, unread_method_keys
from .docs import schema_markdown
from .load import CONFIG_DIR, REPO_ROOT, deepspeed_file, load_config, read_yaml, resolve_config_path, to_yaml
from .schema import FROZEN_PARTITIONS, MethodConfig, RunConfig
from .values import auto_lr_caveat, export_dir, resolved_lr
from .where import ConfigError, Where, need_for, where_for

__all__ = [
    "CONFIG_DIR",
    "REPO_ROOT",
    "FROZEN_PARTITIONS",
    "ConfigError",
    "MethodConfig",
    "RunConfig",
    "Where",
    "auto_lr_caveat",
    "check_paths",
    "deepspeed_file",
    "export_dir",
    "load_config",
    "need_for",
    "read_yaml",
    "resolve_config_path",
    "resolved_lr",
    "schema_markdown",
    "to_yaml",
    "unread_method_keys",
    "where_for",
]
