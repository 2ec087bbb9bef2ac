"""Run syncs in a process of their own, for the tests that kill a run or race two runs.

    python -m klaviyo_pipelines_tests.sync_child CONFIG SYNC [SYNC ...] [--pause] [--no-snapshot]

Snapshots each sync's models, runs it with a fast-retrying client (the sandbox is served by the
parent test process) and prints one JSON line per sync. `--pause` prints `paused` after the
first batch and waits for a line on stdin, so a test can act while this run holds its lock.
Exit status: 0 all succeeded, 1 a sync failed, 3 the sync was locked by another run.
"""

from __future__ import annotations

import argparse
import json
import sys

from klaviyo_pipelines.config import load_config
from klaviyo_pipelines.klaviyo.client import KlaviyoClient
from klaviyo_pipelines.runner import SyncReport, run_sync
from klaviyo_pipelines.warehouse.engine import Warehouse
from klaviyo_pipelines.warehouse.lock import SyncLocked
from klaviyo_pipelines.warehouse.snapshot import take_snapshot

LOCKED = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("syncs", nargs="+")
    parser.add_argument("--pause", action="store_true")
    parser.add_argument("--no-snapshot", action="store_true", help="the parent took them")
    parser.add_argument("--time-scale", type=float, default=20.0)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    wh = Warehouse(config.warehouse.url, config.warehouse.state_schema)
    paused = False

    def pause(report: SyncReport, result: object) -> None:
        nonlocal paused
        if args.pause and not paused:
            paused = True
            print("paused", flush=True)
            sys.stdin.readline()

    status = 0
    with KlaviyoClient(
        config.klaviyo.api_key.resolve(config.path),
        base_url=config.klaviyo.base_url,
        time_scale=args.time_scale,
        timeout=2.0,
        max_backoff=0.5,
    ) as client:
        for name in args.syncs:
            sync = config.syncs[name]
            try:
                if not args.no_snapshot:
                    for model in (sync.model, *sync.extra_models):
                        take_snapshot(wh, config.models[model], config.path)
                report = run_sync(config, name, wh, client, on_batch=pause)
            except SyncLocked as exc:
                print(json.dumps({"sync": name, "locked": str(exc)}), flush=True)
                return LOCKED
            print(json.dumps({"sync": name, **report.summary(), "error": report.error}), flush=True)
            status = status or int(report.status != "success")
    wh.dispose()
    return status


if __name__ == "__main__":
    sys.exit(main())
