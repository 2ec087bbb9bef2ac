"""A Klaviyo-compatible HTTP server on loopback that stands in for Klaviyo in tests and the demo.

Usage: ``with Sandbox(api_key="pk_sandbox_test") as sb:`` then point the client at ``sb.url``,
inspect ``sb.state`` and inject failures with ``sb.faults.add(Fault(...))``.
"""

from klaviyo_pipelines.sandbox.faults import Fault, FaultInjector
from klaviyo_pipelines.sandbox.server import Sandbox, run_forever
from klaviyo_pipelines.sandbox.state import RequestRecord, SandboxState

__all__ = ["Fault", "FaultInjector", "RequestRecord", "Sandbox", "SandboxState", "run_forever"]
