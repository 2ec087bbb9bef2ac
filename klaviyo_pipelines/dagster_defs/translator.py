"""How our assets look in the user's Dagster project: keys, lineage, groups, owners, tags,
kinds and automation, decided in one overridable place.

Like `DagsterSlingTranslator` and `DagsterDltTranslator`: subclass `KlaviyoTranslator`,
override `get_asset_spec` (calling `super()` and `.replace_attributes` / `.merge_attributes`
on its result), and pass an instance to `build_defs`. The YAML's top-level `key_prefix`,
`group`, `owners` and `tags`, `models.<model>.deps` and `syncs.<sync>.automation` cover the
common cases without Python.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import reduce

import dagster as dg

from klaviyo_pipelines.config import AutomationSpec, Config, ModelSpec, SyncSpec
from klaviyo_pipelines.warehouse.dialects import engine_name

# Dagster's kind icons are named for the product, not SQLAlchemy's dialect.
KIND_OF_ENGINE = {"postgresql": "postgres"}


def snapshot_key(model: str) -> dg.AssetKey:
    """A model's snapshot key before any `key_prefix`."""
    return dg.AssetKey(["warehouse", model])


def sync_key(sync: str) -> dg.AssetKey:
    """A sync's key before any `key_prefix`."""
    return dg.AssetKey(["klaviyo", sync])


@dataclass(frozen=True)
class KlaviyoAssetProps:
    """One of our assets: a model's snapshot (`sync` None), or a sync of that model."""

    config: Config
    model: ModelSpec
    sync: SyncSpec | None = None


class KlaviyoTranslator:
    """Decides each asset's spec. A sync's deps are its models' snapshot keys as this
    translator gives them, so a key changed here moves its edges too."""

    def get_asset_spec(self, props: KlaviyoAssetProps) -> dg.AssetSpec:
        config, model, sync = props.config, props.model, props.sync
        settings = config.dagster
        engine = engine_name(config.warehouse.url)
        common = {
            "owners": list(settings.owners),
            "tags": dict(settings.tags),
        }
        if sync is None:
            return dg.AssetSpec(
                key=snapshot_key(model.name).with_prefix(list(settings.key_prefix)),
                deps=[dg.AssetKey(dep.split("/")) for dep in model.deps],
                group_name=settings.group or "warehouse",
                description=f"Snapshot of model {model.name!r} (primary key {model.primary_key}).",
                kinds={"sql", KIND_OF_ENGINE.get(engine, engine)},
                automation_condition=_either(
                    automation_condition(s.automation)
                    for s in config.syncs.values()
                    if model.name in (s.model, *s.extra_models)
                ),
                **common,
            )
        return dg.AssetSpec(
            key=sync_key(sync.name).with_prefix(list(settings.key_prefix)),
            deps=[
                self.get_asset_spec(KlaviyoAssetProps(config, config.models[name])).key
                for name in (sync.model, *sync.extra_models)
            ],
            group_name=settings.group or "klaviyo",
            description=f"{sync.action} of model {sync.model!r} on {', '.join(sync.on)} rows.",
            kinds={"klaviyo", KIND_OF_ENGINE.get(engine, engine)},
            automation_condition=automation_condition(sync.automation),
            **common,
        )


def automation_condition(spec: AutomationSpec | None) -> dg.AutomationCondition | None:
    if spec is None:
        return None
    if spec.kind == "eager":
        return dg.AutomationCondition.eager()
    assert spec.cron is not None
    return dg.AutomationCondition.on_cron(spec.cron)


def _either(conditions: Iterable[dg.AutomationCondition | None]) -> dg.AutomationCondition | None:
    """A snapshot runs when any sync reading it would: the OR of their distinct conditions."""
    found: list[dg.AutomationCondition] = []
    for condition in conditions:
        if condition is not None and condition not in found:
            found.append(condition)
    return reduce(lambda a, b: a | b, found) if found else None


def snapshot_spec(translator: KlaviyoTranslator, config: Config, model: ModelSpec) -> dg.AssetSpec:
    return translator.get_asset_spec(KlaviyoAssetProps(config, model))


def sync_spec(translator: KlaviyoTranslator, config: Config, sync: SyncSpec) -> dg.AssetSpec:
    return translator.get_asset_spec(KlaviyoAssetProps(config, config.models[sync.model], sync))
