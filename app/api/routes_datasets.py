"""``/v1/datasets``: manifests, single files (no path tricks) and a streamed zip of a finished dataset."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse, StreamingResponse

from app.api.deps import CurrentKey, SessionDep
from app.cohort_service import dataset_dir, dataset_documents

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.get("/{dataset_id}", summary="Manifest and privacy report")
def get_dataset(dataset_id: str, request: Request, session: SessionDep, key: CurrentKey) -> dict:
    root = dataset_dir(session, key=key, runner=request.app.state.jobs, dataset_id=dataset_id)
    return {"id": dataset_id, **dataset_documents(root)}


def safe_file(root: Path, name: str) -> Path:
    """Resolve ``name`` inside ``root``; refuse absolute paths, ``..``, hidden parts and backslashes."""
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or any(p in ("", ".", "..") or p.startswith(".") for p in parts)
    ):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid file name")
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {name!r} in this dataset")
    return path


@router.get("/{dataset_id}/files/{name:path}", summary="One file of a dataset")
def get_file(dataset_id: str, name: str, request: Request, session: SessionDep, key: CurrentKey) -> FileResponse:
    root = dataset_dir(session, key=key, runner=request.app.state.jobs, dataset_id=dataset_id)
    return file_response(safe_file(root, name))


def file_response(path: Path, **options: object) -> FileResponse:
    """A released file without ``Last-Modified`` or ``ETag``: nothing in a download says when, or in which order,
    the file was written (every file of a dataset carries one time anyway)."""
    response = FileResponse(path, stat_result=os.stat(path), **options)  # type: ignore[arg-type]
    for header in ("last-modified", "etag"):
        del response.headers[header]
    return response


class _Chunks:
    """A write-only file object whose written bytes are drained as chunks (zip streaming)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.offset = 0

    def write(self, data: bytes) -> int:
        self.buffer.extend(data)
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def stream_zip(root: Path) -> Iterator[bytes]:
    """Zip ``root`` file by file, yielding compressed bytes as they are produced (never the whole archive)."""
    sink = _Chunks()
    with zipfile.ZipFile(sink, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            entry_info = zipfile.ZipInfo.from_file(path, path.relative_to(root).as_posix())  # the dataset's one time
            with (
                archive.open(entry_info, mode="w", force_zip64=True) as entry,
                path.open("rb") as src,
            ):
                while block := src.read(1 << 20):
                    entry.write(block)
                    yield sink.drain()
            yield sink.drain()
    yield sink.drain()


@router.get("/{dataset_id}/archive", summary="The whole dataset as a streamed zip")
def get_archive(dataset_id: str, request: Request, session: SessionDep, key: CurrentKey) -> StreamingResponse:
    return archive_response(dataset_dir(session, key=key, runner=request.app.state.jobs, dataset_id=dataset_id))


def archive_response(root: Path) -> StreamingResponse:
    """A finished dataset directory as a streamed zip download named after the dataset."""
    return StreamingResponse(
        stream_zip(root),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{root.name}.zip"'},
    )
