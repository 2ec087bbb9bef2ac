"""How much CPU does the Klaviyo sandbox spend on each profile a bulk import brings?

The delivery benchmarks run the sandbox beside the client on the same machine, so every
microsecond the emulator spends on a profile is one the client cannot use: the sandbox must
cost less than the client it measures. This sends real Upsert Profile bulk imports (the
action's own request bodies, built from a shop's customers, `shop_data.py`, 10,000 profiles
a job, its few invalid rows included) to a sandbox in its own process, rate limits off, jobs
starting at once, waits until every job completed, and prints the sandbox's CPU per profile.

Each implementation serves in a fresh process: this checkout and a baseline revision (the
package extracted with `git archive`), alternating, `--repeat` runs each; both must import
and refuse the same numbers of profiles.

    .venv/bin/python bench/sandbox_cpu.py [--rows 300000] [--repeat 2] [--baseline REV|none]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from client_cpu import SCENARIOS, build_action, extract, pages
from delivery import API_KEY, SandboxProcess

BEFORE = "6570a6e"  # the sandbox before its per-profile work was made cheaper (issue #15)
JOB_ROWS = 10_000


def request_bodies(rows: int) -> list[bytes]:
    """The Upsert Profile action's bulk import bodies for `rows` shop customers."""
    import duckdb

    from klaviyo_pipelines.actions.profile import InvalidRow

    scenario = SCENARIOS["upsert_profile"]
    con = duckdb.connect()
    con.execute(f"CREATE TABLE shop AS {scenario.model_sql(rows)}")
    model_columns = [d[0] for d in con.execute("SELECT * FROM shop LIMIT 0").description]
    action = build_action(scenario, model_columns)
    items = []
    for page in pages(con, sorted(action.columns), JOB_ROWS):
        for row in page:
            with contextlib.suppress(InvalidRow):  # refused before sending, as the runner does
                items.append(action.prepare(row))
    return [action.request_body(batch) for batch in action.batches(items)]


def import_all(bodies: list[bytes], code: Path | None) -> dict[str, Any]:
    """Serve a sandbox from `code` (None: this checkout), import every body, await the jobs."""
    sandbox = SandboxProcess(env=None if code is None else {**os.environ, "PYTHONPATH": str(code)})
    try:
        sandbox.ask("setup", limits=False, scale=1.0, job_latency=0.0, profiles=0)
        headers = {
            "Authorization": f"Klaviyo-API-Key {API_KEY}",
            "revision": "2026-07-15",
            "Content-Type": "application/vnd.api+json",
            "Accept": "application/vnd.api+json",
        }
        with httpx.Client(base_url=sandbox.url, headers=headers, timeout=120) as client:
            before = sandbox.ask("usage")
            job_ids = []
            for body in bodies:
                created = client.post("/api/profile-bulk-import-jobs", content=body)
                created.raise_for_status()
                job_ids.append(created.json()["data"]["id"])
            imported = refused = 0
            for job_id in job_ids:
                while True:
                    job = client.get(f"/api/profile-bulk-import-jobs/{job_id}").json()
                    attributes = job["data"]["attributes"]
                    if attributes["status"] == "complete":
                        break
                    time.sleep(0.1)
                imported += attributes["completed_count"]
                refused += attributes["failed_count"]
            after = sandbox.ask("usage")
    finally:
        sandbox.close()
    cpu = after["cpu"] - before["cpu"]
    return {
        "cpu": cpu,
        "wall": after["wall"] - before["wall"],
        "imported": imported,
        "refused": refused,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000, help="shop customers")
    parser.add_argument("--repeat", type=int, default=2, help="runs each, alternating")
    parser.add_argument("--baseline", default=BEFORE, help="git revision; 'none' to skip")
    args = parser.parse_args()
    bodies = request_bodies(args.rows)
    with tempfile.TemporaryDirectory() as scratch:
        codes: dict[str, Path | None] = {"this checkout": None}
        if args.baseline != "none":
            codes[f"baseline {args.baseline}"] = extract(args.baseline, Path(scratch))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
        for _ in range(args.repeat):
            for name, code in codes.items():
                runs[name].append(import_all(bodies, code))
    counts = {(r["imported"], r["refused"]) for results in runs.values() for r in results}
    if len(counts) != 1:
        sys.exit(f"the implementations imported and refused different numbers: {counts}")
    imported, refused = counts.pop()
    profiles = imported + refused
    print(
        f"{len(bodies)} bulk imports, {profiles:,} profiles ({refused:,} refused by the "
        "sandbox's rules), rate limits off, jobs start at once; sandbox CPU per profile:"
    )
    for name, results in runs.items():
        per_profile = sorted(r["cpu"] / profiles * 1e6 for r in results)
        walls = ", ".join(f"{r['wall']:.1f}" for r in results)
        figures = ", ".join(f"{us:.1f}" for us in per_profile)
        print(f"  {name:<22} {figures} µs a profile (best {per_profile[0]:.1f}); wall {walls} s")


if __name__ == "__main__":
    main()
