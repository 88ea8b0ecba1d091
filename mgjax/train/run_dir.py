"""Where a run writes: ``train.out_dir``, a local folder or an object-store URI (``gs://``; any ``etils.epath`` one).

A run's records are appended and flushed a line at a time (``metrics.jsonl``) and written by libraries that know
only local files (TensorBoard, tokenizers); object stores take whole objects. So for a URI the run writes its
records to a local mirror (``train.local_dir``; default ``~/.cache/mgjax/runs/<bucket>/<path>``), copies what
changed to ``out_dir`` after each checkpoint and at the end, and a resumed run fetches them back first. Checkpoints
go straight to ``out_dir/checkpoints`` through Orbax, which writes ``gs://`` itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from etils import epath

from mgjax.cli import cache_home

CHECKPOINTS = "checkpoints"


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def join(directory: str, name: str) -> str:
    """``directory/name``, a URI kept a URI (``pathlib`` would make ``gs://b`` ``gs:/b``)."""
    return f"{directory.rstrip('/')}/{name}" if is_uri(directory) else str(Path(directory) / name)


def default_mirror(uri: str) -> Path:
    return Path(cache_home()) / "mgjax" / "runs" / uri.split("://", 1)[1].strip("/")


class RunDir:
    """``local``: the folder the run writes its records to; ``checkpoints``: where Orbax writes (under ``out_dir``
    itself, URI or not); ``push`` / ``pull``: the records to and from ``out_dir`` when it is a URI (no-ops
    otherwise)."""

    def __init__(self, out_dir: str, local_dir: str = ""):
        self.remote = epath.Path(out_dir) if is_uri(out_dir) else None
        self.local = Path(local_dir or default_mirror(out_dir)) if self.remote else Path(out_dir)
        self.checkpoints = (self.remote or self.local) / CHECKPOINTS
        self._pushed: dict[str, tuple[int, int]] = {}

    def _files(self, root) -> list[str]:
        """Relative paths of the run's record files under ``root`` (checkpoints excluded)."""
        found = []
        for folder, dirs, files in root.walk():
            if folder == root and CHECKPOINTS in dirs:
                dirs.remove(CHECKPOINTS)
            found += [str(epath.Path(folder, f).relative_to(root)) for f in files]
        return sorted(found)

    def push(self) -> None:
        """Copy the records changed since the last push to ``out_dir`` (each file a whole object)."""
        if self.remote is None:
            return
        for name in self._files(epath.Path(self.local)):
            stat = (self.local / name).stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
            if self._pushed.get(name) == stamp:
                continue
            target = self.remote / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((self.local / name).read_bytes())
            self._pushed[name] = stamp

    def pull(self) -> None:
        """Fetch the records ``out_dir`` holds into the local mirror (a resumed run continues them)."""
        if self.remote is None or not self.remote.exists():
            return
        for name in self._files(self.remote):
            target = self.local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((self.remote / name).read_bytes())
            stat = target.stat()
            self._pushed[name] = (stat.st_size, stat.st_mtime_ns)
