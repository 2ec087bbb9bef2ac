"""`demo` (demo data, a local sandbox and every sync, twice) and `sandbox` (serve the sandbox)."""

from __future__ import annotations

import argparse
import os
import socket

from klaviyo_pipelines.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    console,
    print_error,
    print_json,
    wants_json,
)
from klaviyo_pipelines.cli.syncs import (
    check,
    exit_code,
    load,
    outcome,
    print_summary,
    run_syncs,
)

DEMO_API_KEY = "pk_sandbox_demo"
DEMO_PORT = 8765
STATUS_ORDER = ("success", "failed", "interrupted")  # the demo's status: its worse run's


def demo(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from klaviyo_pipelines.demo import (
        DEMO_LIST_ID,
        create_demo_warehouse,
        demo_days,
        seed_sandbox,
        simulate_a_day,
    )
    from klaviyo_pipelines.sandbox import Sandbox

    as_json = wants_json(args)
    if args.config:
        os.environ["KLAVIYO_PIPELINES_CONFIG"] = args.config
    with Sandbox(api_key=DEMO_API_KEY, port=_free_port(args.port)) as sandbox:
        seed_sandbox(sandbox)
        os.environ["KLAVIYO_API_KEY"] = DEMO_API_KEY
        os.environ["KLAVIYO_BASE_URL"] = sandbox.url
        config = load(args)
        warehouse = sa.make_url(config.warehouse.url).render_as_string(hide_password=True)
        rows = create_demo_warehouse(
            config.warehouse.url, config.warehouse.state_schema, args.customers
        )
        names = list(config.syncs)
        check(config, names, args)
        if not as_json:
            console.print(
                f"Demo warehouse: {rows} customers, newsletter opt-ins, product views and "
                f"{len(demo_days())} days of orders in {warehouse} (about 1% of customers "
                f"broken on purpose); Klaviyo sandbox at {sandbox.url}",
                highlight=False,
            )
            console.rule("First sync: every row is new (orders backfilled day by day)")
        first = run_syncs(config, names, args, partitions=demo_days())
        if not as_json:
            print_summary(first)
        changes = simulate_a_day(config.warehouse.url)
        if not as_json:
            console.rule("A day of business later: only the changes travel")
            console.print(", ".join(f"{n} {what}" for what, n in changes.items()))
        second = run_syncs(config, names, args)
        state = sandbox.state
        in_sandbox = {
            "profiles": len(state.profiles),
            "vip_list_members": len(state.list_members(DEMO_LIST_ID)),
            "events": len(state.events),
            "subscriptions": len(state.subscriptions),
        }
    code = exit_code([*first.values(), *second.values()])
    if as_json:
        outcomes = [outcome(first), outcome(second)]
        errors = [o["error"] for o in outcomes if o["error"]]
        print_json(
            {
                "status": max((o["status"] for o in outcomes), key=STATUS_ORDER.index),
                "error": "; ".join(errors) or None,
                "warehouse": warehouse,
                "customers": rows,
                "first_run": {"syncs": first},
                "changes": changes,
                "second_run": {"syncs": second},
                "sandbox": in_sandbox,
            }
        )
        return code
    print_summary(second)
    console.print(
        f"\nThe sandbox now holds [bold]{in_sandbox['profiles']}[/bold] profiles, "
        f"[bold]{in_sandbox['vip_list_members']}[/bold] members of the VIP list, "
        f"[bold]{in_sandbox['events']}[/bold] events and consent for "
        f"[bold]{in_sandbox['subscriptions']}[/bold] profiles."
    )
    console.print(
        "Next: [bold]make ui[/bold] opens the Dagster UI on these assets "
        "(with a fresh sandbox); `klaviyo-pipelines status` shows each sync's ledger."
    )
    return code


def sandbox(args: argparse.Namespace) -> int:
    from klaviyo_pipelines.demo import seed_sandbox
    from klaviyo_pipelines.sandbox.server import run_forever

    try:
        run_forever("127.0.0.1", args.port, args.api_key, args.time_scale, setup=seed_sandbox)
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped, even as it starts
        pass
    except OSError as exc:  # the port taken (or not ours to take): say which, not a traceback
        print_error(
            args,
            f"sandbox: cannot listen on 127.0.0.1:{args.port}: {exc.strerror or exc}; "
            "stop what uses the port, or choose another with --port",
        )
        return EXIT_FAILED
    return EXIT_OK


def _free_port(preferred: int) -> int:
    """The preferred port when free, else 0 (any free port), so a second demo still runs."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return 0
