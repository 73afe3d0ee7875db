"""/v1/jobs: submit, list, get, cancel; download the pruned artifact and the report."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..deps import ExecutorDep, MetricsDep, OwnerDep, SettingsDep, StorageDep, StoreDep
from ..errors import ApiError
from ..intake import (
    DataSummary,
    allowed_dataset_uri,
    check_data,
    check_labels_for_risk,
    check_model,
    check_uncertainty,
    copy_dataset_uri,
    data_extension,
    parse_config,
    peek,
    save_stream,
)
from ..report_page import prefers_html, render_report
from ..schemas import ErrorBody, JobPublic, JobsPublic, JobStatus
from ..storage import job_dir
from ..store import SUCCEEDED, Job, JobStore, new_job_id

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ERR = {"model": ErrorBody}


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


@router.post("", status_code=202, response_model=JobPublic,
             responses={401: ERR, 404: ERR, 413: ERR, 422: ERR})
async def create_job(
    response: Response,
    owner: OwnerDep,
    settings: SettingsDep,
    store: StoreDep,
    storage: StorageDep,
    executor: ExecutorDep,
    metrics: MetricsDep,
    model: Annotated[UploadFile | None, File(description="TorchScript archive (torch.jit.save)")] = None,
    data: Annotated[UploadFile | None, File(description="Calibration set: .npz (x, optional y) or safetensors")] = None,
    dataset: Annotated[str | None, Form(description="Instead of `data`: a ds_ id, or an allowed URI")] = None,
    uncertainty: Annotated[UploadFile | None, File(description="safetensors training statistics (for mu)")] = None,
    config: Annotated[str | None, Form(description="JSON object of certification parameters")] = None,
) -> JobPublic:
    """Queue a certification. Inputs are validated here; the model itself only ever runs in a worker."""
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

    job_id = new_job_id()
    base = job_dir(job_id)
    limit = settings.max_upload_bytes
    dataset_id: str | None = None
    try:
        stored_model = await run_in_threadpool(save_stream, storage, model.file, f"{base}/model.pt", limit)
        await run_in_threadpool(check_model, storage, stored_model.path)

        if data is not None:
            ext = data_extension(await run_in_threadpool(peek, data.file))
            stored_data = await run_in_threadpool(save_stream, storage, data.file, f"{base}/data.{ext}", limit)
            data_path, data_sha = stored_data.path, stored_data.sha256
            summary = await run_in_threadpool(check_data, storage, data_path)
        elif dataset and dataset.startswith("ds_"):
            ds = await run_in_threadpool(lambda: store.get_dataset(dataset_id=dataset, owner=owner))
            if ds is None:
                raise ApiError(404, "dataset_not_found",
                               f"No dataset {dataset!r} (it does not exist or belongs to another API key).")
            dataset_id, data_path, data_sha = ds.id, ds.path, ds.sha256
            summary = DataSummary(n=ds.n, x_shape=ds.x_shape, has_labels=ds.has_labels)
        else:
            assert dataset is not None
            if not allowed_dataset_uri(dataset, settings.allowed_dataset_roots):
                raise ApiError(422, "dataset_not_allowed",
                               f"The dataset {dataset!r} is neither a ds_ id nor under a location this server "
                               "allows (CERTIPRUNE_ALLOWED_DATASET_ROOTS). Upload it with POST /v1/datasets.")
            stored_data = await run_in_threadpool(copy_dataset_uri, storage, dataset, f"{base}/data", limit)
            data_path, data_sha = stored_data.path, stored_data.sha256
            summary = await run_in_threadpool(check_data, storage, data_path)
        check_labels_for_risk(cfg, summary)

        uncertainty_path = None
        if uncertainty is not None:
            stored_unc = await run_in_threadpool(save_stream, storage, uncertainty.file,
                                                 f"{base}/uncertainty.safetensors", limit)
            await run_in_threadpool(check_uncertainty, storage, stored_unc.path)
            uncertainty_path = stored_unc.path

        job = await run_in_threadpool(
            lambda: store.create(job_id=job_id, owner=owner, config=cfg.to_dict(), model_path=stored_model.path,
                                 data_path=data_path, model_sha256=stored_model.sha256, data_sha256=data_sha,
                                 dataset_id=dataset_id, uncertainty_path=uncertainty_path)
        )
    except BaseException:
        await run_in_threadpool(storage.remove_tree, base)
        raise
    metrics.jobs_submitted.inc()
    if executor is not None:
        executor.notify()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobPublic.from_job(job)


@router.get("", response_model=JobsPublic, responses={401: ERR})
def list_jobs(
    owner: OwnerDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
) -> JobsPublic:
    """The caller's jobs, newest first; ``count`` is the total over all pages."""
    jobs, count = store.list(owner=owner, limit=limit, offset=offset, status=status)
    return JobsPublic(data=[JobPublic.from_job(j) for j in jobs], count=count)


@router.get("/{job_id}", response_model=JobPublic, responses={401: ERR, 404: ERR})
def get_job(job_id: str, owner: OwnerDep, store: StoreDep) -> JobPublic:
    return JobPublic.from_job(_get_or_404(store, job_id, owner))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses={401: ERR, 404: ERR, 409: ERR})
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


@router.get("/{job_id}/artifact", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}, 401: ERR, 404: ERR, 409: ERR})
def get_artifact(job_id: str, owner: OwnerDep, store: StoreDep, storage: StorageDep) -> Response:
    """The pruned TorchScript archive; verify it against the X-Checksum-SHA256 header."""
    job = _get_or_404(store, job_id, owner)
    _require_succeeded(job, "artifact")
    relpath = f"{job_dir(job_id)}/artifact.pt"
    if not storage.exists(relpath):
        raise ApiError(410, "artifact_missing", f"The artifact of job {job_id} is no longer in storage.")
    headers = {"X-Checksum-SHA256": job.artifact_sha256 or ""}
    filename = f"{job_id}-pruned.pt"
    if storage.is_local:
        return FileResponse(storage.local_path(relpath), media_type="application/octet-stream", filename=filename,
                            headers=headers)

    def chunks():  # remote storage: stream through
        with storage.open(relpath) as fh:
            yield from iter(lambda: fh.read(1024 * 1024), b"")

    headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return StreamingResponse(chunks(), media_type="application/octet-stream", headers=headers)


@router.get("/{job_id}/report", responses={200: {"content": {"application/json": {}, "text/html": {}}},
                                          401: ERR, 404: ERR, 409: ERR})
def get_report(
    job_id: str, owner: OwnerDep, store: StoreDep, accept: Annotated[str | None, Header()] = None
) -> Response:
    """The certificate as JSON, or as an HTML page with the risk-vs-sparsity plot when the client prefers HTML."""
    job = _get_or_404(store, job_id, owner)
    _require_succeeded(job, "report")
    result = job.result or {}
    if prefers_html(accept):
        return HTMLResponse(render_report(job_id, result))
    return JSONResponse(result)
