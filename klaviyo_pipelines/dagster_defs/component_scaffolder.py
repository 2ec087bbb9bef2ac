"""What `dg scaffold defs klaviyo_pipelines.KlaviyoSyncsComponent <path>` writes: a `defs.yaml`
naming a config file, and that file as a starter that loads as it stands (`dg check defs`
passes before anything is edited), its warehouse and key taken from the environment."""

from __future__ import annotations

from dagster.components.component_scaffolding import scaffold_component
from dagster.components.scaffold.scaffold import Scaffolder, ScaffoldRequest

from klaviyo_pipelines.config import DEFAULT_CONFIG_NAME

STARTER_CONFIG = """\
# klaviyo_pipelines: the syncs from your warehouse into Klaviyo (docs/configuration.md).
warehouse:
  url: ${WAREHOUSE_URL:-duckdb:///warehouse.duckdb}
klaviyo:
  api_key: ${KLAVIYO_API_KEY}
models:
  customers:
    table: analytics.customers
    primary_key: customer_id
    # deps: [analytics/customers]   # the asset that builds the table, e.g. a dbt model
syncs:
  customers_to_klaviyo:
    model: customers
    action: upsert_profile
    mapping: {external_id: customer_id, email: email}
    # automation: eager             # run once the model's deps were materialized
"""


class KlaviyoSyncsScaffolder(Scaffolder):
    def scaffold(self, request: ScaffoldRequest) -> None:
        scaffold_component(request, {"config": DEFAULT_CONFIG_NAME})
        folder = request.target_path.parent if request.append else request.target_path
        config = folder / DEFAULT_CONFIG_NAME
        if not config.exists():  # never overwrite the user's syncs
            config.write_text(STARTER_CONFIG)
