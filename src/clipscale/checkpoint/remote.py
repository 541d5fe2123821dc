"""checkpoint.remote: every published checkpoint mirrored to an object store, for a requeued job that
lands on a machine with an empty run directory.

Upload order makes the remote `latest` trustworthy (OpenCLIP's `--remote-sync` can point
`--resume latest` at a checkpoint still being copied): an earlier upload's checksum file of the
same step goes first (the step is uploaded again after a rollback) and with it every object this
upload does not write, then the checkpoint's objects, then its checksum file, and only then
`latest`; a job killed mid-upload leaves the previous `latest` naming a complete checkpoint. The
checksum file covers every object: an extra one is damage. Remote retention follows
checkpoint.keep_last and keeps the loss-spike guard's rollback target; a rollback moves the later
checkpoints to `checkpoints/abandoned/` in the bucket too. Downloads are verified against the
checksum file before anything is loaded (checkpoint.checksum_problem).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from ..errors import CheckpointError
from ..fsutil import remove_path
from ..wds import remote
from .files import checksum_problem
from .names import CHECKSUM_SUFFIX, LATEST, NAME_RE

log = logging.getLogger(__name__)


class RemoteMirror:
    def __init__(self, url: str, keep_last: int = 0, storage_options: dict | None = None):
        self.url, self.keep_last = url.rstrip("/"), keep_last
        self.storage_options = storage_options or {}  # checkpoint.storage_options, not the data's

    def _fs(self):
        fs, root = remote.filesystem(self.url, self.storage_options)
        return fs, root.rstrip("/") + "/checkpoints"

    def upload(self, local: Path, protected: Path | None = None) -> None:
        """Mirror one published checkpoint (file or folder) and its checksum, then move `latest`. The
        bucket's copy of the step then holds exactly the local files."""
        fs, root = self._fs()
        name = local.name
        target = f"{root}/{name}"
        files = {
            f"{target}/{p.relative_to(local).as_posix()}": p for p in sorted(local.rglob("*")) if p.is_file()
        } if local.is_dir() else {target: local}  # fmt: skip
        self._clear_earlier_upload(fs, target, keep=set(files))
        for key, path in files.items():
            remote.with_retries(f"uploading {key[len(root) + 1 :]}", lambda p=path, k=key: fs.put_file(str(p), k))
        sums = local.with_name(name + CHECKSUM_SUFFIX)
        remote.with_retries(f"uploading {sums.name}", lambda: fs.put_file(str(sums), target + CHECKSUM_SUFFIX))
        remote.with_retries(
            f"moving {self.url} latest", lambda: fs.pipe_file(f"{root}/{LATEST}", (name + "\n").encode())
        )
        log.info("mirrored %s to %s/checkpoints/", name, self.url)
        self._retain(fs, root, keep={name, protected.name if protected is not None else name})

    @staticmethod
    def _clear_earlier_upload(fs, target: str, keep: set[str]) -> None:
        """An earlier upload of the same step (before a rollback, or cut short): its checksum file
        first (nothing trusts the step while it changes), then each object this upload won't write."""
        try:
            remote.with_retries(f"removing {target}{CHECKSUM_SUFFIX}", lambda: fs.rm(target + CHECKSUM_SUFFIX))
        except FileNotFoundError:
            pass
        fs.invalidate_cache(target)
        try:
            found = remote.with_retries(f"listing {target}", lambda: fs.find(target))
        except FileNotFoundError:
            return
        stale = sorted(set(found) - keep)
        if stale:
            log.info("removing %d object(s) of an earlier upload of %s", len(stale), target.rsplit("/", 1)[-1])
            remote.with_retries(f"removing stale objects of {target}", lambda: fs.rm(stale))

    def checkpoint_names(self) -> list[str]:
        """The step checkpoints in the bucket (one listing), oldest first."""
        fs, root = self._fs()
        fs.invalidate_cache(root)
        try:
            listed = remote.with_retries(f"listing {root}", lambda: fs.ls(root, detail=False))
            names = {p.rsplit("/", 1)[-1] for p in listed}
        except FileNotFoundError:
            return []
        return sorted((n for n in names if NAME_RE.match(n)), key=lambda n: int(NAME_RE.match(n)[1]))

    def abandon_after(self, name: str) -> None:
        """A rollback to `name`: the bucket's later checkpoints move to checkpoints/abandoned/ and
        `latest` names `name` (a job requeued into an empty folder continues this history)."""
        fs, root = self._fs()
        step = int(NAME_RE.match(name)[1])
        later = [n for n in self.checkpoint_names() if int(NAME_RE.match(n)[1]) > step]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for old in later:
            for item in (old, old + CHECKSUM_SUFFIX):
                try:
                    remote.with_retries(
                        f"moving {item} aside",
                        lambda i=item: fs.mv(f"{root}/{i}", f"{root}/abandoned/{i}.{stamp}", recursive=True),
                    )
                except FileNotFoundError:
                    pass
        remote.with_retries(
            f"moving {self.url} latest", lambda: fs.pipe_file(f"{root}/{LATEST}", (name + "\n").encode())
        )
        if later:
            log.warning("rolled back to %s: moved %s in %s to checkpoints/abandoned/", name, ", ".join(later), self.url)

    def _retain(self, fs, root: str, keep: set[str]) -> None:
        if self.keep_last <= 0:
            return
        names = sorted(
            {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False, refresh=True)} if fs.exists(root) else set()
        )
        steps = sorted((n for n in names if NAME_RE.match(n) and n not in keep), key=lambda n: int(NAME_RE.match(n)[1]))
        for old in steps[: max(0, len(steps) - (self.keep_last - 1))]:
            try:
                fs.rm(f"{root}/{old}", recursive=True)
                if f"{old}{CHECKSUM_SUFFIX}" in names:
                    fs.rm(f"{root}/{old}{CHECKSUM_SUFFIX}")
            except OSError as exn:
                log.warning("could not remove the remote checkpoint %s: %s", old, exn)

    def latest(self) -> str | None:
        """The name the remote `latest` holds (a complete checkpoint), or None."""
        fs, root = self._fs()
        try:
            return (
                remote.with_retries(f"reading {self.url} latest", lambda: fs.cat_file(f"{root}/{LATEST}"))
                .decode()
                .strip()
            )
        except FileNotFoundError:
            return None

    def download(self, name: str, local_dir: Path) -> Path:
        """The checkpoint `name` and its checksum into `local_dir` (a temporary name, then renamed)."""
        fs, root = self._fs()
        local_dir.mkdir(parents=True, exist_ok=True)
        final = local_dir / name
        tmp = local_dir / f".{name}.download-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        source = f"{root}/{name}"
        if fs.isdir(source):
            for path in fs.find(source):
                rel = path[len(source) + 1 :]
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                remote.with_retries(f"downloading {name}/{rel}", lambda p=path, r=rel: fs.get_file(p, str(tmp / r)))
        else:
            remote.with_retries(f"downloading {name}", lambda: fs.get_file(source, str(tmp)))
        sums = local_dir / (name + CHECKSUM_SUFFIX)
        remote.with_retries(f"downloading {sums.name}", lambda: fs.get_file(source + CHECKSUM_SUFFIX, str(sums)))
        problem = checksum_problem(tmp, exact=True, sums=sums)
        if problem:
            remove_path(tmp)
            raise CheckpointError(f"{name} in {self.url} is damaged ({problem})")
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(tmp, final)
        return final
