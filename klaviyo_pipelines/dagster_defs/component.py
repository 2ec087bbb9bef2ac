"""`KlaviyoSyncsComponent`: our syncs in a Dagster components project (`defs.yaml`).

For YAML-first users, as `dagster_sling.SlingReplicationCollectionComponent` and
`dagster_dbt.DbtProjectComponent` are: `dg scaffold defs klaviyo_pipelines.KlaviyoSyncsComponent
<path>` writes a `defs.yaml` and a starter config, and the component loads through the same
`build_defs` as Python users call, so both ways give the same assets.
"""

# No `from __future__ import annotations`: Dagster reads the field types to build the schema.
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any

import dagster as dg
import yaml
from dagster.components.utils.translation import TranslationFn, TranslationFnResolver

from klaviyo_pipelines.config import Config, ConfigError, load_config, parse_config
from klaviyo_pipelines.dagster_defs.build import build_defs
from klaviyo_pipelines.dagster_defs.component_scaffolder import KlaviyoSyncsScaffolder
from klaviyo_pipelines.dagster_defs.resources import DEFAULT_RESOURCE_PREFIX
from klaviyo_pipelines.dagster_defs.translator import KlaviyoAssetProps, KlaviyoTranslator


def resolve_config(context: dg.ResolutionContext, value: str | Mapping[str, Any]) -> Config:
    """A file's path (relative to the `defs.yaml`), or the config written inline.

    The inline config is parsed as our own file would be, without Dagster's `{{ }}` templating:
    `${VAR}` keeps a URL with a password out of Dagster's stored definitions, as in the file.
    A `{{ }}` written there anyway is refused, naming its key, rather than sent as text."""
    if isinstance(value, str):
        path = context.resolve_value(value, as_type=str)  # `{{ project_root }}/...` too
        return load_config(context.resolve_source_relative_path(path))
    tree = context.source_position_tree
    source = f"{tree.position.filename if tree else 'defs.yaml'} (attributes.config)"
    _refuse_templates(value, source, "")
    return parse_config(yaml.safe_dump(dict(value)), source)


def _refuse_templates(value: Any, source: str, key: str) -> None:
    if isinstance(value, Mapping):
        for name, item in value.items():
            _refuse_templates(item, source, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_templates(item, source, f"{key}[{index}]")
    elif isinstance(value, str) and "{{" in value:
        raise ConfigError(
            source,
            key,
            "Dagster's {{ }} templates are not read in an inline config: write ${VAR} for an "
            "environment variable (read when the sync runs, never stored by Dagster), or name a "
            "config file in `config:` ({{ project_root }} works in that path)",
        )


@dg.scaffold_with(KlaviyoSyncsScaffolder)
@dataclass
class KlaviyoSyncsComponent(dg.Component, dg.Resolvable):
    """Klaviyo syncs from a data warehouse: each model's snapshot and each sync as assets.

    Scaffold with ``dg scaffold defs klaviyo_pipelines.KlaviyoSyncsComponent <path>``.

    ``config`` names the klaviyo_pipelines YAML file (relative to ``defs.yaml``) or holds it
    inline; ``translation`` changes each asset's spec (template variables ``props``, a
    ``KlaviyoAssetProps``, and ``spec``); ``resource_prefix`` names our two resources. For
    anything else, subclass and override ``get_asset_spec``."""

    config: Annotated[
        Config,
        dg.Resolver(
            resolve_config,
            model_field_type=str | dict[str, Any],
            inject_before_resolve=False,
            description="The klaviyo_pipelines config: a file's path relative to this "
            "defs.yaml, or the config itself (warehouse, klaviyo, models, syncs).",
            examples=["klaviyo_pipelines.yaml"],
        ),
    ]
    resource_prefix: Annotated[
        str,
        dg.Resolver.default(
            description="Prefix of our resource keys (<prefix>warehouse, <prefix>api).",
        ),
    ] = DEFAULT_RESOURCE_PREFIX
    translation: Annotated[
        TranslationFn[KlaviyoAssetProps] | None,
        TranslationFnResolver(template_vars_for_translation_fn=lambda props: {"props": props}),
    ] = None

    @cached_property
    def translator(self) -> KlaviyoTranslator:
        return _ComponentTranslator(self)

    def get_asset_spec(self, props: KlaviyoAssetProps) -> dg.AssetSpec:
        """Each asset's spec before `translation`: override it as `KlaviyoTranslator`'s."""
        return KlaviyoTranslator.get_asset_spec(self.translator, props)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return build_defs(
            self.config, translator=self.translator, resource_prefix=self.resource_prefix
        )


class _ComponentTranslator(KlaviyoTranslator):
    """The component's `get_asset_spec`, then its `translation`. Being the translator
    `build_defs` asks, it also gives the snapshot keys a sync depends on, so a key the
    translation moves keeps its edges."""

    def __init__(self, component: "KlaviyoSyncsComponent") -> None:
        self.component = component

    def get_asset_spec(self, props: KlaviyoAssetProps) -> dg.AssetSpec:
        spec = self.component.get_asset_spec(props)
        translation = self.component.translation
        return translation(spec, props) if translation is not None else spec
