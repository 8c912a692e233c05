"""Where results go: a local path or a URI (``s3://``, ``gs://``, ``file://``), written whole or not at all.

Ray Train and Tune already keep checkpoints and experiment state at either kind of
path; these few helpers let raytopk's own files (summaries, sweep results) follow
them there. A local file is written beside its target and renamed onto it; an
object store gets the finished file in one upload, so a reader never sees half a file.
"""

import contextlib
import json
import os
import posixpath
import tempfile
import time

__all__ = [
    "is_uri",
    "resolve",
    "join",
    "exists",
    "list_dir",
    "read_bytes",
    "read_text",
    "replacing",
    "write_json",
    "write_figure",
    "provenance",
]


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> str:
    """A URI as it is; a local path expanded and made absolute (workers may run elsewhere)."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def _filesystem(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def exists(path: str) -> bool:
    if not is_uri(path):
        return os.path.exists(path)
    import pyarrow.fs

    fs, inner = _filesystem(path)
    return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound


def list_dir(path: str) -> list:
    """Names of the entries directly under ``path`` (none if it does not exist)."""
    if not is_uri(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    import pyarrow.fs

    fs, inner = _filesystem(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    return sorted(posixpath.basename(info.path) for info in infos)


def read_bytes(path: str) -> bytes:
    if not is_uri(path):
        with open(path, "rb") as f:
            return f.read()
    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode()


@contextlib.contextmanager
def replacing(path: str):
    """Yield a local temporary file; when the block finishes it replaces ``path`` whole.

    An error or a crash inside the block leaves the old file (or none), never a partial one.
    """
    local = not is_uri(path)
    directory = os.path.dirname(os.path.abspath(path)) if local else None
    if local:
        os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".", suffix="." + posixpath.basename(path))
    os.close(fd)
    try:
        yield temporary
        if local:
            os.replace(temporary, path)
        else:
            fs, inner = _filesystem(path)
            fs.create_dir(posixpath.dirname(inner), recursive=True)
            with open(temporary, "rb") as source, fs.open_output_stream(inner) as target:
                target.write(source.read())
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path: str, payload) -> None:
    """Write ``payload`` as JSON to ``path`` through :func:`replacing`: never a partial file."""
    with replacing(path) as temporary, open(temporary, "w") as f:
        json.dump(payload, f, indent=2)


def write_figure(path: str, fig, dpi: int = 120) -> None:
    """Save a matplotlib figure to ``path`` through :func:`replacing` (the format from its extension), then close it."""
    import matplotlib.pyplot as plt

    with replacing(path) as temporary:
        fig.savefig(temporary, dpi=dpi, format=posixpath.splitext(path)[1].lstrip(".") or "png")
    plt.close(fig)


def provenance(command=None) -> dict:
    """What a result file records of how it was made: the UTC time, and the command line when there is one."""
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **({"command": command} if command else {})}
