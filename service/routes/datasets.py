"""/v1/datasets: store a calibration set once, refer to it from many jobs by its ds_ id; list, read, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from ..deps import OwnerDep, SettingsDep, StorageDep, StoreDep
from ..errors import ApiError, reject_unknown_query_parameters
from ..intake import check_data, data_extension, peek, save_stream
from ..schemas import DatasetPublic, DatasetsPublic, ErrorBody
from ..storage import Storage
from ..store import new_dataset_id

router = APIRouter(prefix="/v1/datasets", tags=["datasets"],
                   dependencies=[Depends(reject_unknown_query_parameters)])

ERRORS = {401: {"model": ErrorBody, "description": "No valid API key."},
          413: {"model": ErrorBody, "description": "The upload is larger than the server accepts."},
          422: {"model": ErrorBody, "description": "Not a valid calibration set; the code names the problem."}}


def _discard(storage: Storage, relpath: str) -> None:
    """Remove a stored file of a refused upload (a file, so not ``remove_tree``)."""
    try:
        storage.fs.rm(storage.full(relpath))
    except (OSError, FileNotFoundError):
        pass


@router.post("", status_code=201, response_model=DatasetPublic, responses=ERRORS)
async def create_dataset(
    owner: OwnerDep,
    settings: SettingsDep,
    store: StoreDep,
    storage: StorageDep,
    file: Annotated[UploadFile | None, File(description=".npz (arrays x, optional y) or .safetensors")] = None,
) -> DatasetPublic:
    if file is None:
        raise ApiError(422, "missing_file", "Send the calibration set as the multipart file field 'file' "
                                            "(.npz with arrays 'x' and optional 'y', or .safetensors).")
    dataset_id = new_dataset_id()
    relpath = f"datasets/{dataset_id}.{data_extension(await run_in_threadpool(peek, file.file))}"
    stored = await run_in_threadpool(save_stream, storage, file.file, relpath, settings.max_upload_bytes)
    try:
        summary = await run_in_threadpool(check_data, storage, relpath,
                                          max_inflated_bytes=settings.max_upload_bytes)
        ds = await run_in_threadpool(
            lambda: store.create_dataset(dataset_id=dataset_id, owner=owner, path=relpath, size=stored.size,
                                         sha256=stored.sha256, chunks=stored.chunks_json(), n=summary.n,
                                         x_shape=summary.x_shape,
                                         has_labels=summary.has_labels)
        )
    except BaseException:
        await run_in_threadpool(_discard, storage, relpath)
        raise
    return DatasetPublic.from_dataset(ds)


NOT_FOUND = {404: {"model": ErrorBody, "description": "No such dataset for this API key."}}
AUTH = {401: ERRORS[401]}


def _dataset_or_404(store: Any, dataset_id: str, owner: str) -> Any:
    ds = store.get_dataset(dataset_id=dataset_id, owner=owner)
    if ds is None:
        raise ApiError(404, "dataset_not_found",
                       f"No dataset {dataset_id!r} (it does not exist or belongs to another API key).")
    return ds


@router.get("", response_model=DatasetsPublic, responses=AUTH)
def list_datasets(
    owner: OwnerDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> DatasetsPublic:
    """The caller's stored calibration sets, newest first; ``count`` is the total over all pages."""
    datasets, count = store.list_datasets(owner=owner, limit=limit, offset=offset)
    return DatasetsPublic(data=[DatasetPublic.from_dataset(d) for d in datasets], count=count)


@router.get("/{dataset_id}", response_model=DatasetPublic, responses={**AUTH, **NOT_FOUND})
def get_dataset(dataset_id: str, owner: OwnerDep, store: StoreDep) -> DatasetPublic:
    return DatasetPublic.from_dataset(_dataset_or_404(store, dataset_id, owner))


@router.delete("/{dataset_id}", status_code=204, response_class=Response,
               responses={**AUTH, **NOT_FOUND,
                          409: {"model": ErrorBody, "description": "A queued or running job still reads it."}})
def delete_dataset(dataset_id: str, owner: OwnerDep, store: StoreDep, storage: StorageDep) -> Response:
    """Delete a stored calibration set. Finished jobs that used it keep their results and artifacts."""
    outcome, ds = store.delete_dataset(dataset_id=dataset_id, owner=owner)
    if outcome == "not_found":
        _dataset_or_404(store, dataset_id, owner)  # raises the 404
    if outcome == "in_use":
        raise ApiError(409, "dataset_in_use",
                       f"Dataset {dataset_id} is read by a queued or running job; delete it once those jobs "
                       "have finished (or cancel them).")
    _discard(storage, ds.path)
    return Response(status_code=204)
