"""/v1/jobs: submit, list, get, cancel; download the pruned artifact and the report.

``POST /v1/jobs`` honours an ``Idempotency-Key`` header: the job id is derived from the caller's
tenant and the key, so a retried submission finds the job it created (200, same id), a different
submission under the same key is refused (422 ``idempotency_key_reused``), and two racing
submissions with one key create one job (the store's unique job id decides). Keys are per tenant.
"""

from __future__ import annotations

import hashlib
import uuid
import zlib
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Header, Query, Response, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from calibration.pt2_archive import is_pt2

from ..deps import ExecutorDep, MetricsDep, OwnerDep, SettingsDep, StorageDep, StoreDep
from ..errors import ApiError, reject_unknown_query_parameters
from ..intake import (
    DataSummary,
    check_data,
    check_idempotency_key,
    check_inputs_for_model,
    check_labels_for_risk,
    check_model,
    check_uncertainty,
    copy_dataset_uri,
    data_extension,
    dataset_uri_problem,
    parse_config,
    peek,
    save_stream,
    sha256_stream,
)
from ..report_page import prefers_html, render_report
from ..schemas import ErrorBody, JobPublic, JobsPublic, JobStatus
from ..storage import Storage, job_dir
from ..store import SUCCEEDED, Job, JobStore, new_job_id

router = APIRouter(prefix="/v1/jobs", tags=["jobs"],
                   dependencies=[Depends(reject_unknown_query_parameters)])

AUTH = {401: {"model": ErrorBody, "description": "No valid API key."}}
NOT_FOUND = {404: {"model": ErrorBody, "description": "No such job for this API key."}}
INVALID = {422: {"model": ErrorBody, "description": "Invalid parameters (code `validation_error`)."}}


def _get_or_404(store: JobStore, job_id: str, owner: str) -> Job:
    job = store.get(job_id=job_id, owner=owner)
    if job is None:
        raise ApiError(404, "job_not_found", f"No job {job_id!r} (it does not exist or belongs to another API key).")
    return job


def _require_succeeded(job: Job, what: str) -> None:
    if job.status == SUCCEEDED:
        return
    if job.status in ("queued", "running"):
        raise ApiError(409, "job_not_finished",
                       f"Job {job.id} is {job.status}; its {what} is available once it has succeeded. "
                       f"Poll GET /v1/jobs/{job.id}.")
    raise ApiError(409, "job_not_succeeded", f"Job {job.id} is {job.status}; it has no {what}.")


def idempotent_job_id(owner: str, key: str) -> str:
    """The job id a tenant's Idempotency-Key maps to (unguessable without the tenant's API key)."""
    return "job_" + hashlib.sha256(f"certiprune-idempotency\0{owner}\0{key}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Fingerprint:
    """What a submission asks for, to tell a retry from a different request under the same key."""

    config: dict[str, Any]
    model_sha256: str
    data_sha256: str | None  # uploaded data or a URI's content; None for a ds_ id
    dataset_id: str | None
    uncertainty_sha256: str | None


def _job_fingerprint(storage: Storage, job: Job) -> Fingerprint:
    unc = job.uncertainty_sha256
    if unc is None and job.uncertainty_path:  # admitted before the store recorded it (revision 0003)
        with storage.open(job.uncertainty_path) as fh:
            unc = sha256_stream(fh)
    return Fingerprint(config=dict(job.config), model_sha256=job.model_sha256,
                       data_sha256=None if job.dataset_id else job.data_sha256, dataset_id=job.dataset_id,
                       uncertainty_sha256=unc)


def _replay(storage: Storage, existing: Job, request: Fingerprint, response: Response) -> JobPublic:
    """The job a retried submission created (200), or 422 when the key was used for another request."""
    held = _job_fingerprint(storage, existing)
    if held != request:
        differs = [name for name in ("config", "model_sha256", "data_sha256", "dataset_id", "uncertainty_sha256")
                   if getattr(held, name) != getattr(request, name)]
        raise ApiError(422, "idempotency_key_reused",
                       f"This Idempotency-Key was already used for job {existing.id} with a different request "
                       f"(differs in: {', '.join(d.removesuffix('_sha256') for d in differs)}). Use a new key for a "
                       "new job, or resend exactly the original request to get its job back.")
    response.status_code = 200
    response.headers["Location"] = f"/v1/jobs/{existing.id}"
    response.headers["Idempotent-Replayed"] = "true"
    return JobPublic.from_job(existing)


def _remove_request_files(storage: Storage, base: str, job_folder: str) -> None:
    storage.remove_tree(base)
    if base != job_folder and storage.is_local:  # an idempotent request's own subfolder: drop the parent if empty
        try:
            storage.local_path(job_folder).rmdir()
        except OSError:
            pass


@router.post("", status_code=202, response_model=JobPublic,
             responses={200: {"model": JobPublic, "description": "Replay: the job this Idempotency-Key created."},
                        **AUTH, 404: {"model": ErrorBody, "description": "No such dataset for this API key."},
                        413: {"model": ErrorBody, "description": "The upload is larger than the server accepts."},
                        422: {"model": ErrorBody, "description": "Bad model, data, config or parameters; the code "
                                                                 "names the problem."},
                        429: {"model": ErrorBody, "description": "This API key has as many active jobs as allowed."}})
async def create_job(
    response: Response,
    owner: OwnerDep,
    settings: SettingsDep,
    store: StoreDep,
    storage: StorageDep,
    executor: ExecutorDep,
    metrics: MetricsDep,
    model: Annotated[UploadFile | None, File(description="TorchScript archive (torch.jit.save) or torch.export "
                                                         "archive (torch.export.save, .pt2)")] = None,
    data: Annotated[UploadFile | None, File(description="Calibration set: .npz (x, optional y) or safetensors")] = None,
    dataset: Annotated[str | None, Form(description="Instead of `data`: a ds_ id, or an allowed URI")] = None,
    uncertainty: Annotated[UploadFile | None, File(description="safetensors training statistics (for mu)")] = None,
    config: Annotated[str | None, Form(description="JSON object of certification parameters")] = None,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key",
        description="Makes retries safe: the same key and request return the job already created (200); the same "
                    "key with another request is refused (422 idempotency_key_reused). Scoped to the API key.",
    )] = None,
) -> JobPublic:
    """Queue a certification. Inputs are validated here; the model itself only ever runs in a worker."""
    idem = check_idempotency_key(idempotency_key)
    cfg = parse_config(config)
    if model is None:
        raise ApiError(422, "missing_model", "Send the model as the multipart file field 'model' "
                                             "(a TorchScript archive saved with torch.jit.save).")
    dataset = dataset.strip() if dataset else None
    if data is None and not dataset:
        raise ApiError(422, "missing_data", "Send the calibration data as the file field 'data', or name a stored "
                                            "set with the field 'dataset' (an id from POST /v1/datasets).")
    if data is not None and dataset:
        raise ApiError(422, "conflicting_data", "Send either the file field 'data' or the field 'dataset', not both.")
    if uncertainty is not None and "mu" not in cfg.criterion:
        raise ApiError(422, "uncertainty_without_mu",
                       "An 'uncertainty' file is only used by the criterion 'mu'; add \"mu\" to config.criterion "
                       "or drop the file.")
    is_uri = bool(dataset) and not dataset.startswith("ds_")
    if is_uri:
        assert dataset is not None
        problem = await run_in_threadpool(dataset_uri_problem, dataset, settings.allowed_dataset_roots)  # DNS
        if problem is not None:
            raise ApiError(422, *problem)

    limit = settings.max_upload_bytes
    if idem is None:
        job_id = new_job_id()
        base = job_folder = job_dir(job_id)
    else:
        job_id = idempotent_job_id(owner, idem)
        job_folder = job_dir(job_id)
        base = f"{job_folder}/request-{uuid.uuid4().hex}"  # racing retries never share files
        existing = await run_in_threadpool(lambda: store.get(job_id=job_id, owner=owner))
        if existing is not None:
            request = await run_in_threadpool(_upload_fingerprint, cfg.to_dict(), model, data, dataset, uncertainty,
                                              existing, limit, settings.allowed_dataset_roots)
            return await run_in_threadpool(_replay, storage, existing, request, response)
    quota = settings.max_active_jobs_per_key
    if quota is not None:
        active = await run_in_threadpool(lambda: store.count_active(owner=owner))
        if active >= quota:
            raise ApiError(429, "too_many_active_jobs",
                           f"This API key already has {active} queued or running job(s), the most this server "
                           f"allows (CERTIPRUNE_MAX_ACTIVE_JOBS_PER_KEY={quota}). Wait for one to finish, or "
                           "cancel one, and submit again.", headers={"Retry-After": "30"})

    dataset_id: str | None = None
    unc_sha: str | None = None
    chunks: dict[str, Any] = {}  # each input's 64 MiB chunk digests, for the supervisor's parallel re-check
    try:
        stored_model = await run_in_threadpool(save_stream, storage, model.file, f"{base}/model.pt", limit)
        await run_in_threadpool(check_model, storage, stored_model.path)

        if data is not None:
            ext = data_extension(await run_in_threadpool(peek, data.file))
            stored_data = await run_in_threadpool(save_stream, storage, data.file, f"{base}/data.{ext}", limit)
            data_path, data_sha, chunks["data"] = stored_data.path, stored_data.sha256, stored_data.chunks_json()
            summary = await run_in_threadpool(check_data, storage, data_path,
                                              max_inflated_bytes=settings.max_upload_bytes)
        elif dataset and dataset.startswith("ds_"):
            ds = await run_in_threadpool(lambda: store.get_dataset(dataset_id=dataset, owner=owner))
            if ds is None:
                raise ApiError(404, "dataset_not_found",
                               f"No dataset {dataset!r} (it does not exist or belongs to another API key).")
            dataset_id, data_path, data_sha, chunks["data"] = ds.id, ds.path, ds.sha256, ds.chunks
            summary = DataSummary(n=ds.n, x_shape=ds.x_shape, has_labels=ds.has_labels)
        else:
            assert dataset is not None
            stored_data = await run_in_threadpool(copy_dataset_uri, storage, dataset, f"{base}/data", limit,
                                                  settings.allowed_dataset_roots)
            data_path, data_sha, chunks["data"] = stored_data.path, stored_data.sha256, stored_data.chunks_json()
            summary = await run_in_threadpool(check_data, storage, data_path,
                                              max_inflated_bytes=settings.max_upload_bytes)
        check_labels_for_risk(cfg, summary)
        await run_in_threadpool(check_inputs_for_model, storage, stored_model.path, summary)

        uncertainty_path = None
        if uncertainty is not None:
            stored_unc = await run_in_threadpool(save_stream, storage, uncertainty.file,
                                                 f"{base}/uncertainty.safetensors", limit)
            await run_in_threadpool(check_uncertainty, storage, stored_unc.path)
            uncertainty_path, unc_sha, chunks["uncertainty"] = stored_unc.path, stored_unc.sha256, \
                stored_unc.chunks_json()
        chunks["model"] = stored_model.chunks_json()

        job = await run_in_threadpool(
            lambda: store.create(job_id=job_id, owner=owner, config=cfg.to_dict(), model_path=stored_model.path,
                                 data_path=data_path, model_sha256=stored_model.sha256, data_sha256=data_sha,
                                 dataset_id=dataset_id, uncertainty_path=uncertainty_path,
                                 uncertainty_sha256=unc_sha,
                                 input_chunks={k: v for k, v in chunks.items() if v is not None} or None)
        )
    except IntegrityError:
        await run_in_threadpool(_remove_request_files, storage, base, job_folder)
        winner = await run_in_threadpool(lambda: store.get(job_id=job_id, owner=owner)) if idem else None
        if winner is None:
            raise
        # A concurrent submission with the same key created the job first: this one is its retry.
        request = Fingerprint(config=cfg.to_dict(), model_sha256=stored_model.sha256,
                              data_sha256=None if dataset_id else data_sha, dataset_id=dataset_id,
                              uncertainty_sha256=unc_sha)
        return await run_in_threadpool(_replay, storage, winner, request, response)
    except BaseException:
        await run_in_threadpool(_remove_request_files, storage, base, job_folder)
        raise
    metrics.jobs_submitted.inc()
    if executor is not None:
        executor.notify()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobPublic.from_job(job)


def _upload_fingerprint(config: dict[str, Any], model: UploadFile, data: UploadFile | None, dataset: str | None,
                        uncertainty: UploadFile | None, existing: Job, limit: int,
                        roots: list[str]) -> Fingerprint:
    """The fingerprint of a submission whose key already has a job, computed without storing anything."""
    data_sha: str | None = None
    if data is not None:
        data_sha = sha256_stream(data.file)
    elif dataset and not dataset.startswith("ds_") and existing.dataset_id is None:
        data_sha = _uri_sha256(dataset, limit, roots)  # a URI is snapshotted: its content is what the job read
    return Fingerprint(config=config, model_sha256=sha256_stream(model.file), data_sha256=data_sha,
                       dataset_id=dataset if dataset and dataset.startswith("ds_") else None,
                       uncertainty_sha256=sha256_stream(uncertainty.file) if uncertainty is not None else None)


def _uri_sha256(uri: str, limit: int, roots: list[str]) -> str:
    """sha256 of an (already allowed) dataset URI's content, read as a job would snapshot it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="certiprune-idem-") as tmp:
        scratch = Storage(tmp)
        return copy_dataset_uri(scratch, uri, "probe", limit, roots).sha256


@router.get("", response_model=JobsPublic, responses={**AUTH, **INVALID})
def list_jobs(
    owner: OwnerDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
) -> JobsPublic:
    """The caller's jobs, newest first; ``count`` is the total over all pages."""
    jobs, count = store.list(owner=owner, limit=limit, offset=offset, status=status)
    return JobsPublic(data=[JobPublic.from_job(j) for j in jobs], count=count)


@router.get("/{job_id}", response_model=JobPublic, responses={**AUTH, **NOT_FOUND, **INVALID})
def get_job(job_id: str, owner: OwnerDep, store: StoreDep) -> JobPublic:
    return JobPublic.from_job(_get_or_404(store, job_id, owner))


@router.post("/{job_id}/cancel", response_model=JobPublic,
             responses={**AUTH, **NOT_FOUND, 409: {"model": ErrorBody, "description": "The job already ended."},
                        **INVALID})
def cancel_job(job_id: str, owner: OwnerDep, store: StoreDep) -> JobPublic:
    """Queued: cancelled at once. Running: the worker stops at its next check (killed after a grace period).

    Cancelling a cancelled job is a no-op; a succeeded or failed job cannot be cancelled (409).
    """
    job = _get_or_404(store, job_id, owner)
    if job.status in ("succeeded", "failed"):
        raise ApiError(409, "job_already_finished",
                       f"Job {job_id} has already {job.status}; there is nothing to cancel.")
    job = store.request_cancel(job_id=job_id, owner=owner) or job
    return JobPublic.from_job(job)


@router.delete("/{job_id}", status_code=204, response_class=Response,
               responses={**AUTH, **NOT_FOUND,
                          409: {"model": ErrorBody, "description": "The job is queued or running: cancel it first."},
                          **INVALID})
def delete_job(job_id: str, owner: OwnerDep, store: StoreDep, storage: StorageDep) -> Response:
    """Forget a finished job and remove its files (uploaded model, data copy, artifact) to free storage.

    A stored dataset the job used stays (delete it with ``DELETE /v1/datasets/{id}``).
    """
    outcome, job = store.delete(job_id=job_id, owner=owner)
    if outcome == "not_found":
        raise ApiError(404, "job_not_found", f"No job {job_id!r} (it does not exist or belongs to another API key).")
    if outcome == "not_finished":
        raise ApiError(409, "job_not_finished",
                       f"Job {job_id} is {job.status if job else 'active'}; cancel it first "
                       f"(POST /v1/jobs/{job_id}/cancel), then delete it once it has stopped.")
    # The row is gone first, so nothing can serve a half-removed job; then its folder.
    storage.remove_tree(job_dir(job_id))
    return Response(status_code=204)


def _artifact_extension(storage: Any, relpath: str) -> str:
    """``pt2`` for a torch.export archive (by content: the file is stored as artifact.pt), else ``pt``."""
    try:
        with storage.open(relpath) as fh:
            return "pt2" if is_pt2(fh) else "pt"
    except Exception:
        return "pt"


@router.get("/{job_id}/artifact", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}, **AUTH, **NOT_FOUND,
                       409: {"model": ErrorBody, "description": "The job has not succeeded (yet)."},
                       410: {"model": ErrorBody, "description": "The artifact is no longer stored."}, **INVALID})
def get_artifact(job_id: str, owner: OwnerDep, store: StoreDep, storage: StorageDep,
                 accept_encoding: Annotated[str | None, Header()] = None) -> Response:
    """The pruned model in the upload's format (TorchScript, or .pt2 for a torch.export upload); verify it against the X-Checksum-SHA256 header (of the file itself).

    Sent gzip-compressed when the client accepts it (browsers, httpx, ``curl --compressed``): the
    zeros of a pruned model compress well, and clients decode it transparently.
    """
    job = _get_or_404(store, job_id, owner)
    _require_succeeded(job, "artifact")
    relpath = f"{job_dir(job_id)}/artifact.pt"
    if not storage.exists(relpath):
        raise ApiError(410, "artifact_missing", f"The artifact of job {job_id} is no longer in storage.")
    filename = f"{job_id}-pruned.{_artifact_extension(storage, relpath)}"
    headers = {"X-Checksum-SHA256": job.artifact_sha256 or "", "Vary": "Accept-Encoding"}
    gzip = accepts_gzip(accept_encoding)
    if storage.is_local and not gzip:
        return FileResponse(storage.local_path(relpath), media_type="application/octet-stream", filename=filename,
                            headers=headers)

    def chunks():  # stream through, compressing on the way when asked (level 1: fast, and zeros shrink anyway)
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31) if gzip else None  # wbits 31: a gzip stream
        with storage.open(relpath) as fh:
            for chunk in iter(lambda: fh.read(1024 * 1024), b""):
                out = compressor.compress(chunk) if compressor else chunk
                if out:
                    yield out
        if compressor:
            yield compressor.flush()

    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    if gzip:
        headers["Content-Encoding"] = "gzip"
    return StreamingResponse(chunks(), media_type="application/octet-stream", headers=headers)


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding header allows gzip (``gzip``, ``x-gzip`` or ``*`` with q > 0)."""
    for part in (accept_encoding or "").split(","):
        name, *params = [t.strip() for t in part.split(";")]
        if name.lower() not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        for param in params:
            if param.lower().startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if q > 0:
            return True
    return False


@router.get("/{job_id}/report", responses={200: {"content": {"application/json": {}, "text/html": {}}},
                                          **AUTH, **NOT_FOUND,
                                          409: {"model": ErrorBody, "description": "The job has not succeeded (yet)."},
                                          **INVALID})
def get_report(
    job_id: str, owner: OwnerDep, store: StoreDep, storage: StorageDep,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """The certificate as JSON, or as an HTML page with the risk-vs-sparsity plot when the client prefers HTML."""
    job = _get_or_404(store, job_id, owner)
    _require_succeeded(job, "report")
    result = job.result or {}
    if prefers_html(accept):
        return HTMLResponse(render_report(job_id, result, model_bytes=storage.size(job.model_path)))
    return JSONResponse(result)
