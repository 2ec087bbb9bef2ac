"""Vendor the request schemas the Klaviyo sandbox needs out of Klaviyo's official OpenAPI file.

Why: the sandbox validates every request body against Klaviyo's own schema, but the package
must never read ``../shared`` at run time. This script is the only reader of the 3 MB spec; it
writes a small, self-contained ``klaviyo_pipelines/sandbox/klaviyo_schemas.json`` holding, per
implemented operation, the request-body JSON Schema (``$ref``s inlined, OpenAPI ``nullable``
turned into JSON-Schema ``null`` types), the private-key scopes, rate limits, declared filters
and page-size bounds, plus a ``source`` block recording where it all came from.

Usage (from the repository root)::

    python scripts/vendor_klaviyo_schemas.py [path/to/stable.json] [--output PATH] [--commit SHA]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = "../shared/klaviyo-openapi/stable.json"
DEFAULT_OUTPUT = "klaviyo_pipelines/sandbox/klaviyo_schemas.json"
SOURCE_REPOSITORY = "https://github.com/klaviyo/openapi"
SOURCE_PATH = "openapi/stable.json"
FALLBACK_COMMIT = "f0a30ba41254904dc410d84ca497df68f8872276"

# The operations the sandbox implements. Phase 1, phase 2 (events, consent), then verify's reads.
OPERATION_IDS: tuple[str, ...] = (
    "get_accounts",
    "get_profiles",
    "get_profile",
    "create_profile",
    "update_profile",
    "create_or_update_profile",
    "bulk_import_profiles",
    "get_bulk_import_profiles_jobs",
    "get_bulk_import_profiles_job",
    "get_errors_for_bulk_import_profiles_job",
    "get_profiles_for_bulk_import_profiles_job",
    "get_profile_ids_for_bulk_import_profiles_job",
    "get_list_for_bulk_import_profiles_job",
    "get_list_ids_for_bulk_import_profiles_job",
    "get_lists",
    "get_list",
    "create_list",
    "get_profiles_for_list",
    "get_profile_ids_for_list",
    "add_profiles_to_list",
    "remove_profiles_from_list",
    "create_event",
    "bulk_create_events",
    "bulk_subscribe_profiles",
    "bulk_unsubscribe_profiles",
    "get_events",  # reading back for `verify`
    "get_metrics",
)

# Annotation keywords that cost bytes and validate nothing.
_DROP_KEYWORDS = frozenset(
    {"description", "example", "examples", "externalDocs", "xml", "readOnly", "writeOnly"}
)
_SCHEMA_LIST_KEYWORDS = ("allOf", "anyOf", "oneOf")
_HTTP_METHODS = ("get", "post", "patch", "put", "delete")


class SpecError(Exception):
    """The spec does not look the way this script expects (missing operation, cyclic $ref)."""


def _resolve_pointer(spec: dict[str, Any], ref: str) -> Any:
    if not ref.startswith("#/"):
        raise SpecError(f"only local $refs are supported, got {ref!r}")
    node: Any = spec
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def convert_schema(spec: dict[str, Any], schema: Any, stack: tuple[str, ...] = ()) -> Any:
    """Return ``schema`` as plain JSON Schema: refs inlined, ``nullable`` made explicit."""
    if isinstance(schema, bool) or not isinstance(schema, dict):
        return schema
    nullable = bool(schema.get("nullable"))
    if "$ref" in schema:
        # OpenAPI 3.0 ignores siblings of $ref, but Klaviyo puts `nullable` there on purpose.
        ref = schema["$ref"]
        if ref in stack:
            raise SpecError(f"cyclic $ref {ref!r}; inlining is impossible")
        inlined = convert_schema(spec, _resolve_pointer(spec, ref), (*stack, ref))
        return {"anyOf": [inlined, {"type": "null"}]} if nullable else inlined

    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROP_KEYWORDS or key == "nullable" or key.startswith("x-"):
            continue
        if key == "properties":
            out[key] = {name: convert_schema(spec, sub, stack) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = convert_schema(spec, value, stack)
        elif key in _SCHEMA_LIST_KEYWORDS:
            out[key] = [convert_schema(spec, sub, stack) for sub in value]
        else:
            out[key] = value

    if nullable:
        if "type" in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = [*types, "null"] if "null" not in types else types
            if "enum" in out and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        else:
            for keyword in ("oneOf", "anyOf"):
                if keyword in out:
                    out[keyword] = [*out[keyword], {"type": "null"}]
                    break
    return out


def _page_size(operation: dict[str, Any]) -> dict[str, int] | None:
    for param in operation.get("parameters", []):
        if param.get("in") == "query" and param.get("name") == "page[size]":
            schema = param.get("schema", {})
            return {
                "default": schema.get("default"),
                "minimum": schema.get("minimum", 1),
                "maximum": schema.get("maximum"),
            }
    return None


def _sorts(operation: dict[str, Any]) -> list[str] | None:
    for param in operation.get("parameters", []):
        if param.get("in") == "query" and param.get("name") == "sort":
            return list(param.get("schema", {}).get("enum", []))
    return None


def _index_operations(spec: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    index: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for path, item in spec["paths"].items():
        for method in _HTTP_METHODS:
            operation = item.get(method)
            if operation and "operationId" in operation:
                index[operation["operationId"]] = (method.upper(), path, operation)
    return index


def extract_operation(spec: dict[str, Any], method: str, path: str, op: dict[str, Any]) -> dict:
    """Everything the sandbox needs about one operation, in plain JSON."""
    request_schema = None
    content = op.get("requestBody", {}).get("content", {})
    if content:
        media = content.get("application/vnd.api+json") or next(iter(content.values()))
        request_schema = convert_schema(spec, media["schema"])
        request_schema = {"$schema": "http://json-schema.org/draft-07/schema#", **request_schema}
    return {
        "method": method,
        "path": path,
        "scopes": list(op.get("x-klaviyo-scopes", [])),
        "ratelimit": op.get("x-klaviyo-ratelimit"),
        "filters": op.get("x-klaviyo-filters"),
        "page_size": _page_size(op),
        "sorts": _sorts(op),
        "request_schema": request_schema,
    }


def _commit_from_source_md(spec_path: Path) -> str | None:
    source_md = spec_path.with_name("SOURCE.md")
    if not source_md.is_file():
        return None
    match = re.search(r"\|\s*Commit\s*\|\s*`([0-9a-f]{40})`", source_md.read_text("utf-8"))
    return match.group(1) if match else None


def build(spec_path: Path, commit: str | None) -> dict[str, Any]:
    """Read the spec at ``spec_path`` and return the vendored document."""
    raw = spec_path.read_bytes()
    spec = json.loads(raw)
    index = _index_operations(spec)
    missing = [op_id for op_id in OPERATION_IDS if op_id not in index]
    if missing:
        raise SpecError(f"operations not found in spec: {', '.join(missing)}")
    operations = {op_id: extract_operation(spec, *index[op_id]) for op_id in OPERATION_IDS}
    return {
        "source": {
            "repository": SOURCE_REPOSITORY,
            "commit": commit or _commit_from_source_md(spec_path) or FALLBACK_COMMIT,
            "path": SOURCE_PATH,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "revision": spec.get("info", {}).get("version"),
            "openapi": spec.get("openapi"),
            "operation_ids": list(OPERATION_IDS),
            "generated_by": "scripts/vendor_klaviyo_schemas.py",
            "license": "MIT (c) 2022 Klaviyo, see the repository's LICENSE",
        },
        "operations": operations,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=DEFAULT_INPUT, help="path to stable.json")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="where to write the JSON")
    parser.add_argument("--commit", default=None, help="commit of klaviyo/openapi the spec is at")
    args = parser.parse_args(argv)

    spec_path = Path(args.spec)
    if not spec_path.is_absolute():
        spec_path = REPO_ROOT / spec_path
    output = Path(args.output)
    if not output.is_absolute():
        output = REPO_ROOT / output

    document = build(spec_path, args.commit)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    size = output.stat().st_size
    print(f"wrote {output} ({size:,} bytes, {len(document['operations'])} operations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
