"""The Dagster code location: `Definitions` built from the user's YAML config.

`workspace.yaml` loads this module, so it reads the config when imported: the file named by
$KLAVIYO_PIPELINES_CONFIG, else ./klaviyo_pipelines.yaml, else the bundled demo config (so
`dagster dev` in a fresh clone shows working assets). To embed the syncs in your own project,
call `klaviyo_pipelines.build_defs` instead: it reads nothing until called.
"""

from __future__ import annotations

import dagster as dg

from klaviyo_pipelines.config import Config, load_config
from klaviyo_pipelines.dagster_defs.build import (
    build_assets,
    build_defs,
    build_executor,
    build_resources,
)

__all__ = ["build_assets", "build_definitions", "build_resources", "defs"]


def build_definitions(config: Config) -> dg.Definitions:
    """Our own code location: `build_defs`, plus the in-process executor a DuckDB file needs."""
    return build_defs(config, executor=build_executor(config))


defs = build_definitions(load_config())
