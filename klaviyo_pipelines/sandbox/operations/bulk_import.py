"""Profile bulk import: accept a job (202), process it in the background, report per-row errors.

Why it matters: this is the high-volume path of the reverse ETL. A client submits up to 10,000
profiles, polls the job until ``complete``, then reads ``import-errors``; each error's
``source.pointer`` is ``/data/attributes/profiles/data/<index>``, the row's position in the
submitted array, and ``original_payload`` is the row as sent, so failures map back to warehouse
rows. Rows are refused (never the whole job) for: a profile over 100 KB, malformed email, the
``.invalid`` domain, a phone number that is not valid E.164, external_id over 255 characters, no
identifier, identifiers owned by two different profiles, an unknown ``id``, or the
``reject_profile`` hook.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import orjson

from klaviyo_pipelines.klaviyo.endpoints import PROFILE_BULK_IMPORT
from klaviyo_pipelines.sandbox.errors import ApiError, invalid
from klaviyo_pipelines.sandbox.filters import parse_filter
from klaviyo_pipelines.sandbox.messages import ApiResponse
from klaviyo_pipelines.sandbox.operations.common import (
    Ctx,
    profile_problem,
    render_profile,
    sort_param,
    writable_attributes,
)
from klaviyo_pipelines.sandbox.pagination import page_request, paginate
from klaviyo_pipelines.sandbox.resources import (
    identifier,
    import_error_resource,
    job_resource,
    list_resource,
)
from klaviyo_pipelines.sandbox.state import BulkImportJob, SandboxState, new_import_error, utcnow

CHUNK_ROWS = 250  # rows per lock hold; small enough not to stall request threads
JOB_TTL = timedelta(days=7)
MAX_PROFILE_BYTES = PROFILE_BULK_IMPORT.max_item_bytes or 100 * 1024


def bulk_import_profiles(ctx: Ctx) -> ApiResponse:
    data = ctx.body["data"]
    rows: list[dict[str, Any]] = data["attributes"]["profiles"]["data"]
    if not rows:
        raise invalid("At least one profile is required.", pointer="/data/attributes/profiles/data")
    list_ids = [
        entry["id"]
        for entry in ((data.get("relationships") or {}).get("lists") or {}).get("data") or []
    ]
    with ctx.state.lock:
        for list_id in list_ids:
            ctx.state.get_list(list_id)
        job = ctx.state.add_job(rows, list_ids)
        resource = job_resource(job, ctx.base_url)
    ctx.worker.schedule(ctx.job_delay, _JobRunner(ctx.state, job, ctx.job_delay))
    return ApiResponse(202, {"data": resource, "links": {"self": resource["links"]["self"]}})


class _JobRunner:
    """The job's background steps: queued -> processing (chunk by chunk) -> complete.

    With ``job_delay`` d the job stays ``queued`` for d seconds, then spends about d seconds
    ``processing`` (completed_count grows per chunk), so both states are observable."""

    def __init__(self, state: SandboxState, job: BulkImportJob, job_delay: float) -> None:
        self.state = state
        self.job = job
        chunks = max(1, -(-job.total_count // CHUNK_ROWS))
        self.pause = job_delay / chunks

    def __call__(self) -> float | None:
        state, job = self.state, self.job
        with state.lock:
            if state.jobs.get(job.id) is not job:  # the account was reset
                return None
            if job.status == "queued":
                job.status = "processing"
                job.started_at = utcnow()
                return self.pause
            end = min(job.next_index + CHUNK_ROWS, job.total_count)
            imported: dict[str, None] = {}
            for index in range(job.next_index, end):
                profile_id = _import_row(state, job, index, job.rows[index])
                if profile_id is not None:
                    imported[profile_id] = None
            job.next_index = end
            for profile_id in imported:
                if profile_id not in job.profile_ids_set:
                    job.profile_ids_set.add(profile_id)
                    job.profile_ids.append(profile_id)
            for list_id in job.list_ids:
                if list_id in state.lists:
                    state.add_members(list_id, imported)
            if end < job.total_count:
                return self.pause
            job.status = "complete"
            job.completed_at = utcnow()
            job.expires_at = job.completed_at + JOB_TTL
            job.rows = []
            return None


def _import_row(
    state: SandboxState, job: BulkImportJob, index: int, row: dict[str, Any]
) -> str | None:
    """Upsert one row; on refusal record an import error and return None."""
    size = _json_size(row)
    problem: tuple[str, str] | None = None
    if size > MAX_PROFILE_BYTES:
        problem = (
            "invalid",
            f"Profile payload is {size} bytes; the maximum is {MAX_PROFILE_BYTES} bytes (100KB).",
        )
    else:
        attrs = writable_attributes(row.get("attributes") or {})
        profile_id = row.get("id")
        found = profile_problem(state, attrs, require_identifier=not profile_id)
        if found:
            problem = ("invalid", found[1])
        else:
            try:
                profile, _ = state.upsert_profile(attrs, profile_id, row.get("meta"))
            except ApiError as error:
                first = error.errors[0]
                problem = (first["code"], first["detail"])
            else:
                job.completed_count += 1
                return profile.id
    job.failed_count += 1
    job.errors.append(new_import_error(index, problem[0], problem[1], row))
    return None


def _json_size(row: dict[str, Any]) -> int:
    """Bytes of the row as compact UTF-8 JSON (orjson's, at a tenth of the standard library's
    cost; the standard library's for what orjson cannot write, such as integers over 64 bits)."""
    try:
        return len(orjson.dumps(row))
    except orjson.JSONEncodeError:
        return len(json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode())


def _job(ctx: Ctx, key: str = "id") -> BulkImportJob:
    return ctx.state.get_job(ctx.params[key])


def get_bulk_import_profiles_job(ctx: Ctx) -> ApiResponse:
    with ctx.state.lock:
        job = _job(ctx, "job_id")
        resource = job_resource(job, ctx.base_url)
        document: dict[str, Any] = {"data": resource, "links": {"self": resource["links"]["self"]}}
        if "lists" in (ctx.request.param("include") or "").split(","):
            document["included"] = [
                list_resource(ctx.state.lists[i], ctx.base_url)
                for i in job.list_ids
                if i in ctx.state.lists
            ]
    return ApiResponse(200, document)


def get_bulk_import_profiles_jobs(ctx: Ctx) -> ApiResponse:
    page = page_request(ctx.request, ctx.op.page_size)
    raw_filter = ctx.request.param("filter")
    exprs = parse_filter(raw_filter, ctx.op.filters) if raw_filter is not None else []
    sort = sort_param(ctx)
    with ctx.state.lock:
        jobs = list(ctx.state.jobs.values())
        for expr in exprs:
            jobs = [j for j in jobs if j.status in expr.values]
        if sort is not None and sort[1]:
            jobs.reverse()
        chunk, links = paginate(jobs, page, ctx.base_url, ctx.request)
        data = [job_resource(j, ctx.base_url) for j in chunk]
    return ApiResponse(200, {"data": data, "links": links})


def get_errors_for_bulk_import_profiles_job(ctx: Ctx) -> ApiResponse:
    page = page_request(ctx.request, ctx.op.page_size)
    with ctx.state.lock:
        chunk, links = paginate(list(_job(ctx).errors), page, ctx.base_url, ctx.request)
        data = [import_error_resource(e) for e in chunk]
    return ApiResponse(200, {"data": data, "links": links})


def get_profiles_for_bulk_import_profiles_job(ctx: Ctx) -> ApiResponse:
    page = page_request(ctx.request, ctx.op.page_size)
    with ctx.state.lock:
        chunk, links = paginate(list(_job(ctx).profile_ids), page, ctx.base_url, ctx.request)
        data = [
            render_profile(ctx, ctx.state.profiles[i]) for i in chunk if i in ctx.state.profiles
        ]
    return ApiResponse(200, {"data": data, "links": links})


def get_profile_ids_for_bulk_import_profiles_job(ctx: Ctx) -> ApiResponse:
    page = page_request(ctx.request, ctx.op.page_size)
    with ctx.state.lock:
        chunk, links = paginate(list(_job(ctx).profile_ids), page, ctx.base_url, ctx.request)
    return ApiResponse(200, {"data": [identifier("profile", i) for i in chunk], "links": links})


def get_list_for_bulk_import_profiles_job(ctx: Ctx) -> ApiResponse:
    with ctx.state.lock:
        job = _job(ctx)
        data = [
            list_resource(ctx.state.lists[i], ctx.base_url)
            for i in job.list_ids
            if i in ctx.state.lists
        ]
    return ApiResponse(200, {"data": data, "links": {"self": f"{ctx.base_url}{ctx.request.path}"}})


def get_list_ids_for_bulk_import_profiles_job(ctx: Ctx) -> ApiResponse:
    with ctx.state.lock:
        data = [identifier("list", i) for i in _job(ctx).list_ids]
    return ApiResponse(200, {"data": data, "links": {"self": f"{ctx.base_url}{ctx.request.path}"}})


HANDLERS = {
    "bulk_import_profiles": bulk_import_profiles,
    "get_bulk_import_profiles_jobs": get_bulk_import_profiles_jobs,
    "get_bulk_import_profiles_job": get_bulk_import_profiles_job,
    "get_errors_for_bulk_import_profiles_job": get_errors_for_bulk_import_profiles_job,
    "get_profiles_for_bulk_import_profiles_job": get_profiles_for_bulk_import_profiles_job,
    "get_profile_ids_for_bulk_import_profiles_job": get_profile_ids_for_bulk_import_profiles_job,
    "get_list_for_bulk_import_profiles_job": get_list_for_bulk_import_profiles_job,
    "get_list_ids_for_bulk_import_profiles_job": get_list_ids_for_bulk_import_profiles_job,
}
