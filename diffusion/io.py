"""One path API for every file the project reads or writes: local paths and ``gs://`` alike.

Everything that touches the workdir, the evaluation store, the FID reference cache, the
checkpoint quarantine or the reproduction outputs goes through these functions, so a run works
the same on ``/tmp/run`` and on ``gs://bucket/run`` (a TPU pod's workdir). They are built on
``etils.epath``, the path library Orbax and TFDS already use:

* local paths go through ``os`` (atomic writes: a temporary file in the same folder, flushed
  and fsync'ed, then ``os.replace``d onto the name);
* ``gs://`` (and any other scheme epath knows: ``s3://``, ...) goes through ``epath.Path``,
  which uses TensorFlow's GCS client when TensorFlow is installed, or fsspec/gcsfs when
  ``EPATH_USE_TF=false``. A write there is a single object upload: the object appears complete
  or not at all, which is what "atomic" can mean on an object store (there is no rename).

Paths are passed and returned as ``str`` (``os.PathLike`` is accepted everywhere), so
``os.path.join`` on them keeps working; `path` gives the ``epath.Path`` when one is needed.

Object-store semantics worth knowing (they shape the functions below):

* There are no directories, only name prefixes. `makedirs` is a no-op there (it must not create
  a *bucket*, which gcsfs would do for a missing one), a "directory" exists once an object
  under it does, and `move` of a directory is a copy of every object followed by a delete.
* There is no append. `append_line` on an object store reads the object, adds the line and
  writes the whole object back: sound for the one writer the project has per file (process 0
  writes ``metrics.jsonl``), costs O(file size) per call, and must not be used by two writers
  of the same file at once (the last upload would win).
* Errors of a remote store are turned into a `StorageError` naming the path and the fix by
  `probe_writable`, which callers run on the output folders before any compilation.
"""

from __future__ import annotations

import io as _stdio
import json
import logging
import os
import re
import shutil
import socket
import uuid
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
from etils import epath

__all__ = [
    "PathLike",
    "StorageError",
    "is_remote",
    "path",
    "join",
    "absolute",
    "exists",
    "isdir",
    "isfile",
    "listdir",
    "makedirs",
    "remove",
    "rmtree",
    "read_bytes",
    "write_bytes",
    "read_text",
    "write_text",
    "read_json",
    "write_json",
    "append_line",
    "read_jsonl",
    "write_npz",
    "read_npz",
    "image_grid",
    "encode_png",
    "write_png",
    "save_image_grid",
    "upscale_nearest",
    "scaled_path",
    "save_sample_grid",
    "save_figure",
    "copy",
    "move",
    "probe_writable",
]

PathLike = Union[str, os.PathLike]
_MISSING = object()


class StorageError(OSError):
    """A path cannot be read or written; the message names the path and the fix.

    A subclass of ``OSError``, so ``except OSError`` around file I/O keeps catching it.
    """


# ----------------------------------------------------------------------------- paths
def _str(p: PathLike) -> str:
    return os.fspath(p)


def is_remote(p: PathLike) -> bool:
    """True for a URI with a scheme other than ``file://`` (``gs://b/x``, ``s3://b/x``); False
    for a local path."""
    s = _str(p)
    return "://" in s and s.split("://", 1)[0].lower() not in ("", "file")


def _local(p: PathLike) -> str:
    """A local path as an absolute, user-expanded string (``file://`` stripped)."""
    s = _str(p)
    if s.startswith("file://"):
        s = s[len("file://") :]
    return os.path.abspath(os.path.expanduser(s))


def path(p: PathLike) -> epath.Path:
    """``p`` as an ``etils.epath.Path`` (local paths made absolute and ``~``-expanded)."""
    return epath.Path(_str(p) if is_remote(p) else _local(p))


def join(base: PathLike, *parts: str) -> str:
    """``base/part/...`` as a string, for local paths and URIs alike."""
    return os.path.join(_str(base), *parts)


def absolute(p: PathLike) -> str:
    """A local path made absolute and ``~``-expanded (Orbax needs absolute paths); a URI is
    returned unchanged."""
    return _str(p) if is_remote(p) else _local(p)


def exists(p: PathLike) -> bool:
    """True when ``p`` is a file or a directory (on an object store: an object, or a prefix of
    one)."""
    return os.path.exists(_local(p)) if not is_remote(p) else path(p).exists()


def isdir(p: PathLike) -> bool:
    """True when ``p`` is a directory (on an object store: a prefix of at least one object)."""
    return os.path.isdir(_local(p)) if not is_remote(p) else path(p).is_dir()


def isfile(p: PathLike) -> bool:
    """True when ``p`` is a file (on an object store: an object)."""
    return os.path.isfile(_local(p)) if not is_remote(p) else path(p).is_file()


def listdir(p: PathLike) -> List[str]:
    """The names (not paths) in directory ``p``, sorted. Raises FileNotFoundError when ``p``
    does not exist (on an object store: no object under the prefix)."""
    if not is_remote(p):
        return sorted(os.listdir(_local(p)))
    d = path(p)
    if not d.is_dir():
        raise FileNotFoundError(f"No such directory: {_str(p)}")
    return sorted(c.name for c in d.iterdir())


def makedirs(p: PathLike) -> None:
    """Creates directory ``p`` and its parents if missing (like ``os.makedirs(exist_ok=True)``).

    A no-op on object stores: they have no directories (a prefix exists once an object under it
    does), and creating the "parents" of ``gs://bucket/dir`` through gcsfs would create the
    *bucket* when it is missing instead of reporting it (use `probe_writable` for that).
    """
    if not is_remote(p):
        os.makedirs(_local(p), exist_ok=True)


def remove(p: PathLike, *, missing_ok: bool = True) -> None:
    """Deletes file ``p``; a missing file is fine unless ``missing_ok=False``."""
    try:
        if is_remote(p):
            if not path(p).exists():
                raise FileNotFoundError(f"No such file: {_str(p)}")
            path(p).unlink()
        else:
            os.remove(_local(p))
    except FileNotFoundError:
        if not missing_ok:
            raise


def rmtree(p: PathLike, *, missing_ok: bool = True) -> None:
    """Deletes directory ``p`` with everything in it (on an object store: every object under
    the prefix); a missing one is fine unless ``missing_ok=False``."""
    if not exists(p):
        if missing_ok:
            return
        raise FileNotFoundError(f"No such directory: {_str(p)}")
    if is_remote(p):
        path(p).rmtree()
    else:
        shutil.rmtree(_local(p))


# ----------------------------------------------------------------------------- bytes and text
def read_bytes(p: PathLike) -> bytes:
    """The content of file ``p``. Raises FileNotFoundError when it does not exist."""
    if not is_remote(p):
        with open(_local(p), "rb") as f:
            return f.read()
    return path(p).read_bytes()


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes ``data`` to file ``p`` atomically: readers see the old content or the new one,
    never a part.

    Local: a temporary file next to ``p`` (parents created), flushed and fsync'ed, then
    ``os.replace``d onto ``p``. Object store: one object upload (an object becomes visible only
    once its upload completes; there is no rename to do).
    """
    data = bytes(data)
    if is_remote(p):
        path(p).write_bytes(data)
        return
    dst = _local(p)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = os.path.join(
        os.path.dirname(dst), f".{os.path.basename(dst)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def read_text(p: PathLike) -> str:
    """The content of text file ``p`` (UTF-8)."""
    return read_bytes(p).decode("utf-8")


def write_text(p: PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``p`` atomically, as `write_bytes`."""
    write_bytes(p, text.encode("utf-8"))


def read_json(p: PathLike, default: Any = _MISSING) -> Any:
    """The JSON value in file ``p``; ``default`` when the file does not exist (when given,
    else FileNotFoundError)."""
    try:
        return json.loads(read_bytes(p))
    except FileNotFoundError:
        if default is _MISSING:
            raise
        return default


def write_json(p: PathLike, obj: Any, **json_kwargs) -> None:
    """Writes ``json.dumps(obj, **json_kwargs)`` to ``p`` atomically (as `write_bytes`); e.g.
    ``indent=2, sort_keys=True``. The text is the same as ``json.dump(obj, f, **json_kwargs)``."""
    write_text(p, json.dumps(obj, **json_kwargs))


def append_line(p: PathLike, line: str) -> None:
    """Appends ``line`` (a newline is added if missing) to text file ``p``, creating it.

    A last line cut short by an earlier crash is ended first, so the new line stays whole
    (`read_jsonl` skips the cut one).

    Local: an ``O_APPEND`` write (parents created), so concurrent appenders of whole lines do
    not interleave. Object store (no append there): read the object, add the line, upload the
    whole object: every upload is complete, but it costs O(file size) per call and is only
    sound with one writer per file at a time (the project's ``metrics.jsonl`` is written by
    process 0 only); two concurrent writers would lose lines.
    """
    if not line.endswith("\n"):
        line += "\n"
    if not is_remote(p):
        dst = _local(p)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "ab+") as f:
            data = line.encode("utf-8")
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data  # a line cut short by an earlier crash stays apart
            f.write(data)
        return
    try:
        old = read_bytes(p)
    except FileNotFoundError:
        old = b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    write_bytes(p, old + line.encode("utf-8"))


def read_jsonl(p: PathLike) -> List[Any]:
    """The JSON values of the lines of ``p`` (``[]`` when the file does not exist). Blank lines
    are skipped, and so are lines that are not valid JSON (cut short by a crash while a run
    appended), with a warning."""
    try:
        lines = read_text(p).splitlines()
    except FileNotFoundError:
        return []
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            logging.warning("%s: skipping line %d, not valid JSON: %.80r", _str(p), i + 1, line)
    return out


# ----------------------------------------------------------------------------- arrays
def write_npz(p: PathLike, **arrays) -> None:
    """``np.savez`` of ``arrays`` into memory, then written to ``p`` atomically (`write_bytes`)."""
    buf = _stdio.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(p, buf.getvalue())


def read_npz(p: PathLike, keys: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """The arrays of the ``.npz`` file ``p`` as ``{name: array}`` (only ``keys`` when given;
    a missing key raises KeyError), loaded with ``allow_pickle=False``. Raises
    FileNotFoundError when ``p`` does not exist, and numpy's/zipfile's errors when it is
    truncated or corrupt."""
    with np.load(_stdio.BytesIO(read_bytes(p)), allow_pickle=False) as z:
        return {k: z[k] for k in (z.files if keys is None else keys)}


# ----------------------------------------------------------------------------- images, figures
def image_grid(images: np.ndarray) -> np.ndarray:
    """Tiles uint8 images ``[N, H, W, C]`` into a square grid ``[rows*(H+2)+2, cols*(W+2)+2,
    C]`` with 2-pixel white borders (the layout of the training-time sample grids)."""
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = images[
            i
        ]
    return grid


def encode_png(image: np.ndarray, scale: int = 1) -> bytes:
    """PNG bytes of a uint8 image ``[H, W, C]`` (C = 1 is stored as grayscale), enlarged
    ``scale`` times with nearest-neighbour pixels; encoded in memory with Pillow, byte for byte
    what ``Image.save(<file>.png)`` writes."""
    from PIL import Image

    im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = _stdio.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_png(p: PathLike, image: np.ndarray, scale: int = 1) -> None:
    """Writes uint8 image ``[H, W, C]`` as a PNG to ``p`` (encoded in memory, then written
    atomically); ``scale`` as in `encode_png`."""
    write_bytes(p, encode_png(image, scale))


def upscale_nearest(image: np.ndarray, scale: int) -> np.ndarray:
    """``image [H, W, ...]`` enlarged ``scale`` times by nearest neighbour: ``[scale*H, scale*W,
    ...]``, each pixel repeated ``scale`` x ``scale`` (``np.repeat`` on both axes)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if scale == 1:
        return image
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def save_image_grid(images: np.ndarray, p: PathLike, scale: int = 1) -> None:
    """Tiles uint8 images ``[N, H, W, C]`` into a square PNG grid (`image_grid`,
    ``[rows*(H+2)+2, cols*(W+2)+2, C]``) at ``p``, each pixel repeated ``scale`` x ``scale``
    (`upscale_nearest`; ``scale`` times as high and wide)."""
    write_png(p, upscale_nearest(image_grid(images), scale))


#: How much `save_sample_grid`'s viewing copy enlarges a sample grid (nearest neighbour).
VIEW_SCALE = 4


def scaled_path(p: PathLike, scale: int = VIEW_SCALE) -> str:
    """``<p without extension>_x<scale><extension>``, e.g. ``eval/samples.png`` ->
    ``eval/samples_x4.png``."""
    root, ext = os.path.splitext(_str(p))
    return f"{root}_x{scale}{ext}"


def save_sample_grid(images: np.ndarray, p: PathLike) -> str:
    """Writes the sample grid of uint8 ``images [N, H, W, C]`` at ``p`` (`save_image_grid`) and a
    `VIEW_SCALE` x nearest-neighbour copy for viewing beside it (`scaled_path`: ``<name>_x4.png``,
    ``[4*rows*(H+2)+8, 4*cols*(W+2)+8, C]``); returns the copy's path. The training loop's
    ``samples/step_*.png`` and the evaluation's grids are written with it."""
    save_image_grid(images, p)
    big = scaled_path(p)
    save_image_grid(images, big, VIEW_SCALE)
    return big


def save_figure(fig, p: PathLike, **savefig_kwargs) -> None:
    """Saves a matplotlib figure to ``p`` (rendered in memory in the format of ``p``'s
    extension, then written atomically); e.g. ``dpi=110``."""
    fmt = savefig_kwargs.pop("format", None) or os.path.splitext(_str(p))[1].lstrip(".") or "png"
    buf = _stdio.BytesIO()
    fig.savefig(buf, format=fmt, **savefig_kwargs)
    write_bytes(p, buf.getvalue())


# ----------------------------------------------------------------------------- copy, move
def _files_under(p: PathLike) -> Iterable[str]:
    """Relative paths (``/``-separated) of every file under directory ``p``."""
    if not is_remote(p):
        root = _local(p)
        for d, _, files in os.walk(root):
            for f in files:
                yield os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
        return
    stack = [("", path(p))]
    while stack:
        rel, d = stack.pop()
        for child in d.iterdir():
            r = f"{rel}{child.name}"
            if child.is_dir():
                stack.append((r + "/", child))
            else:
                yield r


def copy(src: PathLike, dst: PathLike) -> None:
    """Copies file or directory tree ``src`` to ``dst`` (local or remote, in any combination),
    overwriting files that exist; each file is written with `write_bytes`."""
    if not isdir(src):
        write_bytes(dst, read_bytes(src))
        return
    makedirs(dst)
    for rel in _files_under(src):
        write_bytes(join(dst, rel), read_bytes(join(src, rel)))


def move(src: PathLike, dst: PathLike) -> str:
    """Moves file or directory ``src`` to ``dst`` (which must not exist; its parent is created)
    and returns ``dst`` as a string.

    Local to local: ``shutil.move`` (a rename on one file system). Otherwise (object stores
    have no rename of a prefix): every file is copied to ``dst``, then ``src`` is deleted; an
    interruption leaves a complete or partial copy at ``dst`` and ``src`` intact (never a loss).
    Raises FileNotFoundError if ``src`` is missing, FileExistsError if ``dst`` exists.
    """
    if not exists(src):
        raise FileNotFoundError(f"Cannot move {_str(src)}: it does not exist")
    if exists(dst):
        raise FileExistsError(f"Cannot move {_str(src)} to {_str(dst)}: the target exists")
    if not is_remote(src) and not is_remote(dst):
        d = _local(dst)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        shutil.move(_local(src), d)
        return _str(dst)
    copy(src, dst)
    if isdir(src):
        rmtree(src)
    else:
        remove(src)
    return _str(dst)


# ----------------------------------------------------------------------------- diagnosis
def _bucket(p: PathLike) -> Optional[str]:
    s = _str(p)
    if not is_remote(s):
        return None
    scheme, rest = s.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def _kind(e: BaseException) -> str:
    """'missing' | 'permission' | 'other' for an error of a file operation (OSError from
    os/gcsfs, or TensorFlow's errors, which are not OSErrors)."""
    name = type(e).__name__
    text = str(e).lower()
    code = getattr(e, "code", None)
    status = {int(m) for m in re.findall(r"(?<![\w.:/-])(40[134])(?![\w.])", text)}
    if code in (401, 403):
        status.add(code)
    if (
        isinstance(e, PermissionError)
        or name in ("PermissionDeniedError", "UnauthenticatedError")
        or status & {401, 403}
        or any(
            k in text
            for k in (
                "forbidden",
                "unauthorized",
                "permission denied",
                "access denied",
                "does not have storage",
            )
        )
    ):
        return "permission"
    if (
        isinstance(e, FileNotFoundError)
        or name == "NotFoundError"
        or code == 404
        or 404 in status
        or "bucket does not exist" in text
        or "no such bucket" in text
    ):
        return "missing"
    return "other"


def probe_writable(d: PathLike, *, what: str = "directory") -> str:
    """Checks that files can be created, read and deleted in directory ``d`` (creating it if
    needed) by writing, reading and deleting a small probe file; returns ``d`` as a string.

    Meant for the output folders (workdir, eval dir, FID cache) right after start-up, before
    any compilation, so that a bad path fails in seconds. ``what`` names the folder in the
    message (e.g. ``"--workdir"``).

    Raises:
      StorageError: naming ``d`` and the fix: the bucket does not exist (create it, or fix the
        path), permission denied (grant the credentials object create/read/delete on the
        bucket, or log in), or a local folder that cannot be written (choose another path or
        fix its permissions).
    """
    s = _str(d)
    probe = join(s, f".write_probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    step = "create"
    try:
        makedirs(s)
        write_bytes(probe, b"ok")
        step = "read"
        if read_bytes(probe) != b"ok":
            raise OSError(f"read back different bytes from {probe}")
        step = "delete"
        remove(probe, missing_ok=False)
        return s
    except Exception as e:  # classified into a message with the fix
        raise StorageError(_probe_message(s, what, step, e)) from e


def _probe_message(d: str, what: str, step: str, e: BaseException) -> str:
    cause = f"{type(e).__name__}: {str(e).strip()[:400]}"
    if not is_remote(d):
        return (
            f"The {what} {d!r} is not writable (could not {step} a file there: {cause}). "
            "Choose another path, or fix its permissions."
        )
    bucket = _bucket(d)
    kind = _kind(e)
    if kind == "missing" or (kind == "other" and _bucket_missing(bucket)):
        return (
            f"The {what} {d!r} is in bucket {bucket}, which does not exist (or is not "
            f"visible to these credentials): {cause}. Create it (e.g. `gcloud storage "
            f"buckets create {bucket} --location=<region of the TPUs>`) or fix the path."
        )
    if kind == "permission":
        return (
            f"Permission denied to {step} objects in the {what} {d!r}: {cause}. Grant the "
            f"credentials in use (the TPU VM's service account, or "
            f"GOOGLE_APPLICATION_CREDENTIALS / `gcloud auth application-default login`) "
            f"object create, read and delete on {bucket} (e.g. roles/storage.objectAdmin), "
            "or choose a bucket they can write."
        )
    return (
        f"Could not {step} a file in the {what} {d!r}: {cause}. Check the path, the "
        f"network and the credentials for {bucket}."
    )


def _bucket_missing(bucket: Optional[str]) -> bool:
    """True only when the store says ``bucket`` does not exist (False when it cannot tell)."""
    if bucket is None:
        return False
    try:
        return not path(bucket).exists()
    except Exception:  # noqa: BLE001 - cannot tell
        return False
