"""POST /v1/datasets: store a calibration set once, refer to it from many jobs by its ds_ id."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, UploadFile
from starlette.concurrency import run_in_threadpool

from ..deps import OwnerDep, SettingsDep, StorageDep, StoreDep
from ..errors import ApiError, reject_unknown_query_parameters
from ..intake import check_data, data_extension, peek, save_stream
from ..schemas import DatasetPublic, ErrorBody
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
        summary = await run_in_threadpool(check_data, storage, relpath)
        ds = await run_in_threadpool(
            lambda: store.create_dataset(dataset_id=dataset_id, owner=owner, path=relpath, size=stored.size,
                                         sha256=stored.sha256, n=summary.n, x_shape=summary.x_shape,
                                         has_labels=summary.has_labels)
        )
    except BaseException:
        await run_in_threadpool(_discard, storage, relpath)
        raise
    return DatasetPublic.from_dataset(ds)
