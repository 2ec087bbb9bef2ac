"""Reverse ETL from a data warehouse into Klaviyo, run by Dagster.

`build_defs(config)` gives a config's Dagster definitions, to merge into your own project;
`KlaviyoTranslator` decides their asset keys, lineage and automation; `KlaviyoSyncsComponent`
gives the same to a Dagster components project (`defs.yaml`). All are imported on first use,
so `import klaviyo_pipelines` (and the CLI's `--help`) stays light and reads no config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from klaviyo_pipelines.dagster_defs.build import build_defs
    from klaviyo_pipelines.dagster_defs.component import KlaviyoSyncsComponent
    from klaviyo_pipelines.dagster_defs.translator import KlaviyoAssetProps, KlaviyoTranslator

__all__ = ["KlaviyoAssetProps", "KlaviyoSyncsComponent", "KlaviyoTranslator", "build_defs"]


def __getattr__(name: str) -> Any:
    if name == "build_defs":
        from klaviyo_pipelines.dagster_defs.build import build_defs

        return build_defs
    if name in ("KlaviyoTranslator", "KlaviyoAssetProps"):
        from klaviyo_pipelines.dagster_defs import translator

        return getattr(translator, name)
    if name == "KlaviyoSyncsComponent":
        from klaviyo_pipelines.dagster_defs.component import KlaviyoSyncsComponent

        return KlaviyoSyncsComponent
    raise AttributeError(f"module 'klaviyo_pipelines' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy names too: `dg list components` finds our component by listing this module."""
    return sorted({*globals(), *__all__})
