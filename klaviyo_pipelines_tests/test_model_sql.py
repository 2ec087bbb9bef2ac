"""A model's SQL runs as the user wrote it: a trailing `-- comment`, a `;`, and colons inside
string literals (`':x'`, `'12:30'`, PostgreSQL's `::` casts) are the user's, never parameters."""

from __future__ import annotations

import json

import sqlalchemy as sa

from klaviyo_pipelines.config import parse_config
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.snapshot import take_snapshot


def test_comments_semicolons_and_colons_in_model_sql(warehouse_url):
    wh = Warehouse(warehouse_url)
    with wh.engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS m"))
        conn.execute(sa.text("DROP TABLE IF EXISTS m.people"))
        conn.execute(sa.text("CREATE TABLE m.people (id INTEGER, email VARCHAR)"))
        conn.execute(sa.text("INSERT INTO m.people VALUES (1, 'a@x.example'), (2, 'b@x.example')"))
    select = "select id, email, ':x' as tag, '12:30' as slot from m.people where email <> ':email'"
    models = {
        "commented": {"sql": f"{select} -- the people we sync", "primary_key": "id"},
        "terminated": {"sql": f"{select};\n", "primary_key": "id"},
    }
    syncs = {
        f"{name}_profiles": {
            "model": name,
            "action": "upsert_profile",
            "mapping": {"email": "email"},
        }
        for name in models
    }
    text = json.dumps({"warehouse": {"url": warehouse_url}, "models": models, "syncs": syncs})
    config = parse_config(text, "test.yaml")
    for name in models:
        stats = take_snapshot(wh, config.models[name], config.path)
        assert stats.rows == 2
        with wh.engine.connect() as conn:
            query = f"SELECT DISTINCT tag, slot FROM {wh.table(f'snapshot__{name}')}"
            assert conn.execute(sa.text(query)).all() == [(":x", "12:30")]
