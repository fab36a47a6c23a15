"""Downloading and extracting a dataset archive, and the MD5 checksum that checks its files.

``download_archive`` fetches a URL into a temporary file beside the destination, checks its MD5
and renames it into place, so a failed or interrupted download never leaves a partial archive
(nor the folders it created). ``extract_folder`` writes an archive's one top folder member by
member, refusing links, devices, absolute and ``..`` paths, through a temporary folder renamed
into place at the end. Every problem a user can fix is raised as ``UserError``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from ..errors import UserError
from ..files import create_temp_file

#: Environment variable that replaces the default download URL (for mirrors).
DOWNLOAD_URL_ENV = "DML_DOWNLOAD_URL"
#: Seconds to wait on the network before giving up (connect and each read).
DOWNLOAD_TIMEOUT_S = 60.0


def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks so large files never sit in memory whole."""
    # usedforsecurity=False: MD5 is an integrity check here, and FIPS builds refuse it otherwise.
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_url(url: str | None, official: str, archive: str) -> str:
    """The URL to download ``archive`` (a file name) from: ``url``, else ``$DML_DOWNLOAD_URL``, else
    ``official``; a URL ending in "/" names a mirror folder and gets ``archive`` appended."""
    if url is None:
        url = os.environ.get(DOWNLOAD_URL_ENV) or official
    if url.endswith("/"):
        url += archive
    return url


def download_archive(url: str, dest: Path, *, title: str, folder: str, md5: str | None, progress: bool) -> None:
    """Download ``url`` to ``dest``, the archive of ``title`` (e.g. "CIFAR-100") whose top folder is
    ``folder``, and check that its MD5 is ``md5`` (None: not checked).

    A failed download leaves nothing behind: no partial archive (which a later run would mistake
    for a complete one), and none of the folders it created."""
    created = []  # the folders above dest that do not exist yet, deepest first
    parent = dest.parent
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    try:
        _fetch(url, dest, title, folder, md5, progress)
    except BaseException:  # Ctrl-C too
        for parent in created:
            try:
                parent.rmdir()  # only if still empty: never what someone else put there meanwhile
            except OSError:
                break
        raise


def _fetch(url: str, dest: Path, title: str, folder: str, md5: str | None, progress: bool) -> None:
    """Download ``url`` to ``dest`` via a temporary file, renamed into place once complete and checked."""
    from tqdm.auto import tqdm  # imported here: only downloads need it

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = create_temp_file(dest, ".part")
    except OSError as e:
        raise UserError(f"cannot write the {title} download into {dest.parent}: {e}") from e
    tmp = Path(tmp_name)
    try:
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "dml-cifar-loader"})
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
                size = response.headers.get("Content-Length")
                with tqdm(
                    total=int(size) if size and size.isdigit() else None,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=f"downloading {dest.name}",
                    disable=not progress,
                ) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        except (OSError, http.client.HTTPException, ValueError) as e:
            # OSError covers URLError/HTTPError, refused connections and timeouts;
            # HTTPException a connection cut mid-body; ValueError a malformed URL.
            reason: object  # what the message says went wrong
            if isinstance(e, urllib.error.HTTPError):
                reason = f"HTTP {e.code} {e.reason}"
            else:
                reason = getattr(e, "reason", None) or e
            raise UserError(
                f"could not download {title} from {url} ({reason}); download "
                f"{dest.name} yourself and place it at {dest} (or its extracted folder at "
                f"{dest.parent / folder}), or use --download-url URL to name a mirror"
            ) from e
        if md5 is not None:
            actual = md5sum(tmp)
            if actual != md5:
                raise UserError(
                    f"the archive downloaded from {url} has md5 {actual}, but the official "
                    f"{dest.name} has md5 {md5}; the download is damaged, or the mirror "
                    f"serves a non-official copy, which --skip-checksum accepts"
                )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def extract_folder(archive: Path, root: Path, folder: str, *, kind: str, url: str) -> None:
    """Extract ``folder`` from ``archive`` into ``root``, refusing unsafe members. ``kind`` names
    what the archive should be (e.g. "CIFAR-100 python-version archive") and ``url`` where it comes
    from, for the error messages.

    Members are written one by one instead of via ``extractall`` so the safety checks do not
    depend on ``tarfile``'s ``filter=`` (missing in older Python 3.10/3.11 patch releases).
    Everything lands in a temporary folder first and is renamed into place at the end, so an
    interrupted extraction never leaves a half-filled folder that would be taken as complete.
    """
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=".extract", dir=root))
    except OSError as e:
        raise UserError(f"cannot extract {archive} into {root}: {e}") from e
    try:
        staging_resolved = staging.resolve()
        try:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:
                    target = staging / _safe_member_path(member, archive)
                    # Belt and braces: the normalised path must still lie inside staging.
                    if not target.resolve().is_relative_to(staging_resolved):
                        raise UserError(f"archive {archive} has an unsafe member {member.name!r}")
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None  # regular file, checked above
                    with source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
            extracted = staging / folder
            if not extracted.is_dir():
                raise UserError(f"archive {archive} does not contain the folder {folder}/; it is not a {kind} ({url})")
            os.replace(extracted, root / folder)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise UserError(
                f"archive {archive} is truncated or corrupt ({e}); delete it and download it again from {url}"
            ) from e
        except OSError as e:
            raise UserError(f"could not extract {archive} into {root}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _safe_member_path(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """The member's relative path; UserError for links, devices, absolute paths or ``..``."""
    if not (member.isfile() or member.isdir()):
        # Links could point outside the target; devices and FIFOs never belong in a dataset archive.
        raise UserError(
            f"archive {archive} has member {member.name!r} that is not a regular file or folder "
            f"(a link or device); refusing to extract it"
        )
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or "\\" in member.name or not member.name:
        raise UserError(
            f"archive {archive} has member {member.name!r} with an absolute or parent-relative "
            f"path; refusing to extract it"
        )
    return path
