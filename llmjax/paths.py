"""Every path a user gives, local or on object storage, as an `etils.epath.Path` (orbax's own
path type; fsspec/gcsfs underneath for `gs://`, s3fs for `s3://` when installed).

`pathlib.Path("gs://b/x")` silently becomes the local directory `gs:/b/x`, so user paths never
go through pathlib: `resolve` checks the scheme (a typo such as `gs:/x` or `gcs://x` is a
one-line error naming the fix), the bucket and the credentials (once per bucket and process),
and returns an epath.Path that works the same for a local directory and a bucket.

Libraries that only read or write local files (sentencepiece training, array_record, GGUF,
tensorboardX event files) go through `local_copy` (download once into a cache) and
`staged_output` (build in a local temporary directory, upload on success).
"""
from __future__ import annotations

import contextlib
import functools
import glob as local_glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Union

from etils import epath

from llmjax.errors import ConfigError, MissingInputError

PathLike = Union[str, os.PathLike]
# Schemes that work wherever a local path does: gs (tested against a real GCS server, see
# tests/gcs_server.py) and s3 (the same fsspec path, through s3fs when it is installed; untested).
REMOTE_SCHEMES = ("gs", "s3")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(/*)(.*)$")
_MISSPELLED = {"gcs": "gs", "google": "gs", "s3a": "s3", "s3n": "s3"}
_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# Google's bucket naming rules (3-63 characters; up to 222 with dots): checked here because
# gcsfs accepts any name while tensorstore (orbax's array bytes) rejects a bad one only at the
# first checkpoint save, after the run has trained.
_GCS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def scheme(path: PathLike) -> str:
    """'gs', 's3' or '' (local) for a path already checked by `check`."""
    match = _SCHEME.match(os.fspath(path))
    return match.group(1).lower() if match and match.group(2) == "//" else ""


def is_remote(path: PathLike) -> bool:
    return scheme(path) in REMOTE_SCHEMES


def check(path: PathLike, key: str = "path") -> str:
    """`path` as a string, or a ConfigError naming `key`, the path and the fix when its scheme
    is misspelled (`gs:/b/x`, `gs:b/x`, `gcs://b/x`) or unsupported (`http://...`)."""
    text = os.fspath(path)
    match = _SCHEME.match(text)
    if not match or (len(match.group(1)) == 1 and os.name == "nt"):  # no scheme (or C:\ drive)
        return text
    name, slashes, rest = match.group(1), match.group(2), match.group(3)
    fixed = _MISSPELLED.get(name.lower(), name.lower())
    if fixed in REMOTE_SCHEMES and (slashes != "//" or name != fixed):
        raise ConfigError(f"{key}={text!r} is not a valid object storage URL; write it as "
                          f"{fixed}://{rest.lstrip('/') or 'BUCKET/PATH'} (two slashes, scheme "
                          f"'{fixed}')")
    if slashes == "//" and name in REMOTE_SCHEMES:
        bucket = rest.split("/")[0]
        if not bucket:
            raise ConfigError(f"{key}={text!r} names no bucket; write it as {name}://BUCKET/PATH")
        if name == "gs" and not _valid_gcs_bucket(bucket):
            raise ConfigError(f"{key}={text!r}: {bucket!r} is not a valid GCS bucket name (3-63 "
                              f"lowercase letters, digits, '-', '_' or '.', starting and ending "
                              f"with a letter or digit); use the name of your bucket")
        return text
    if slashes == "//":
        raise ConfigError(f"{key}={text!r} uses the unsupported scheme {name!r}; use a local path, "
                          f"gs://BUCKET/PATH or s3://BUCKET/PATH")
    return text  # a local name that merely contains ':' (e.g. 'run:1')


def _valid_gcs_bucket(bucket: str) -> bool:
    if not _GCS_BUCKET.match(bucket) or ".." in bucket:
        return False
    return len(bucket) <= 63 or ("." in bucket and all(len(p) <= 63 for p in bucket.split(".")))


def resolve(path: PathLike, key: str = "path", *, check_bucket: bool = True) -> epath.Path:
    """The epath.Path of a user path (local: `~` expanded). For object storage the bucket
    must exist and credentials must be found (checked once per bucket), else a one-line
    ConfigError naming `key`, the path and the fix."""
    text = check(path, key)
    if not is_remote(text):
        return epath.Path(os.path.expanduser(text))
    if check_bucket:
        _check_bucket(scheme(text), bucket_of(text), key, text)
    return epath.Path(text)


def absolute(path: PathLike, key: str = "path", *, check_bucket: bool = True) -> epath.Path:
    """`resolve`, with a local path made absolute: what is recorded in checkpoints (a run's
    tokenizer, an export's origin, a PEFT base) must not depend on the reader's directory."""
    resolved = resolve(path, key, check_bucket=check_bucket)
    return resolved if is_remote(resolved) else resolved.absolute()


def bucket_of(path: str) -> str:
    """The bucket of a checked `scheme://bucket/...` URL."""
    return path.split("/")[2]


@functools.lru_cache(maxsize=None)
def _bucket_exists(kind: str, bucket: str) -> bool:
    return filesystem(kind).exists(bucket)


def _check_bucket(kind: str, bucket: str, key: str, text: str) -> None:
    if kind == "gs":
        _check_gcs_credentials(key, text)
    try:
        exists = _bucket_exists(kind, bucket)
    except ConfigError:  # the client package is missing: its own message names the extra
        raise
    except Exception as err:  # the storage client's own error types: say what failed
        raise ConfigError(f"{key}={text!r}: cannot reach bucket {bucket!r} "
                          f"({type(err).__name__}: {_first_line(err)}); {_access_fix(kind)}") from None
    if not exists:
        raise ConfigError(f"{key}={text!r}: bucket {bucket!r} does not exist (or these credentials "
                          f"cannot see it); create it (gcloud storage buckets create "
                          f"{kind}://{bucket}) or fix the bucket name")


def _check_gcs_credentials(key: str, text: str) -> None:
    if os.environ.get(_EMULATOR_ENV):
        return  # an emulator or on-premises store: no Google credentials needed
    try:
        _google_default_credentials()
    except Exception as err:
        raise ConfigError(f"{key}={text!r}: no Google Cloud credentials found ({_first_line(err)}); "
                          f"{_access_fix('gs')}") from None


@functools.lru_cache(maxsize=None)
def _google_default_credentials():
    import google.auth

    return google.auth.default()


def _access_fix(kind: str) -> str:
    if kind == "gs":
        return ("run `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS "
                "to a key file; on a TPU VM check its service account), or set STORAGE_EMULATOR_HOST "
                "(and TENSORSTORE_GCS_HTTP_URL) for a GCS-compatible server, see docs/storage.md")
    return "set AWS credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) or FSSPEC_S3_ENDPOINT_URL, see docs/storage.md"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def filesystem(kind: str):
    """The fsspec filesystem of `kind` ('gs' -> gcsfs), for what epath does not offer (glob
    of several files, recursive copies). A missing client package names its extra."""
    import fsspec

    package = {"gs": "gcsfs", "s3": "s3fs"}[kind]
    if os.environ.get(_EMULATOR_ENV):  # gcsfs's bucket-type probe asks Google's control API
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        __import__(package)
    except ImportError:
        raise ConfigError(f"{kind}:// paths need the Python package {package!r}: "
                          f"pip install 'llmjax[{'gcs' if kind == 'gs' else 's3'}]'") from None
    try:  # the very instance epath (and so orbax) uses: one listing cache, kept coherent
        from etils.epath import backend
        return backend.fsspec_backend.fs(f"{kind}://")
    except (ImportError, AttributeError):  # another etils layout: a filesystem of our own
        return fsspec.filesystem(kind)


def forget_listings(path: PathLike) -> None:
    """Drop this process's cached directory listings under `path` (object storage): gcsfs
    caches listings per process, so after another process (host 0) changed a directory the
    others must forget what they listed before. A no-op for local paths."""
    text = os.fspath(path)
    if is_remote(text):
        filesystem(scheme(text)).invalidate_cache(text)


def glob(pattern: str, key: str = "path") -> list[str]:
    """Sorted files matching `pattern` (`**` recursive), local or `gs://bucket/...`."""
    text = check(pattern, key)
    if not is_remote(text):
        return sorted(p for p in local_glob.glob(os.path.expanduser(text), recursive=True)
                      if os.path.isfile(p))
    kind = scheme(text)
    resolve(text.split("*")[0].split("?")[0].split("[")[0] or text, key)  # bucket + credentials
    fs = filesystem(kind)
    found = fs.glob(text, detail=True)  # one listing, not one request per file
    return sorted(f"{kind}://{p}" for p, info in found.items() if info.get("type") == "file")


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` as a string, without pathlib's `//` collapsing for URLs."""
    return os.fspath(epath.Path(os.fspath(base)).joinpath(*parts))


def move(source: PathLike, target: PathLike) -> epath.Path:
    """Move the file or directory `source` to `target` (which must not exist). Local: one
    atomic rename. Object storage has no rename: every object is copied (server side), then
    the sources are deleted, through the fsspec filesystem epath uses (epath's own rename
    insists that the target's parent "directory" exists, which on object storage it does
    only once an object is under it). Copy-then-delete: a failure leaves the source whole."""
    source_text, target_text = check(source), check(target)
    if not is_remote(source_text) and not is_remote(target_text):
        return epath.Path(source_text).rename(target_text)
    if scheme(source_text) != scheme(target_text):
        raise ValueError(f"cannot move {source_text} to {target_text}: another storage")
    fs = filesystem(scheme(source_text))
    if fs.exists(target_text):
        raise FileExistsError(f"{target_text} already exists; cannot move {source_text} there")
    if fs.isdir(source_text):  # copy everything first: a failure leaves the source whole
        names = fs.find(source_text)  # bucket/key, without the scheme
        prefix = source_text.split("://", 1)[1].rstrip("/")
        fs.copy(names, [f"{target_text.rstrip('/')}/{n[len(prefix):].lstrip('/')}" for n in names])
        fs.rm(source_text, recursive=True)
    else:
        fs.copy(source_text, target_text)
        fs.rm(source_text)
    return epath.Path(target_text)


def exists(path: PathLike, key: str = "path") -> bool:
    return resolve(path, key).exists()


def require(path: PathLike, key: str, what: str = "file or directory") -> epath.Path:
    """The epath of `path`, or MissingInputError naming `key` when it does not exist."""
    resolved = resolve(path, key)
    if not resolved.exists():
        raise MissingInputError(f"{key}={os.fspath(path)!r} does not exist; give the path of an "
                                f"existing {what}")
    return resolved


# ---------------------------------------------------------------- bridging local-only libraries


def mirror_path(path: PathLike) -> str:
    """Where `local_copy` keeps the copy of a remote `path` ($LLMJAX_CACHE/remote/<scheme>/<bucket>/<path>);
    a local path is returned as it is."""
    text = os.fspath(path)
    if not is_remote(text):
        return os.path.expanduser(text)
    return os.path.join(cache_root(), "remote", scheme(text), text.split("://", 1)[1].rstrip("/"))


def signature(path: PathLike) -> tuple[int, str]:
    """(size, modification stamp) of a file, local or remote: changes when the file does."""
    text = os.fspath(path)
    if not is_remote(text):
        return os.path.getsize(text), str(int(os.path.getmtime(text)))
    info = filesystem(scheme(text)).info(text)
    return int(info.get("size") or 0), str(info.get("updated") or info.get("mtime") or info.get("generation") or "")


def cache_root() -> str:
    """llmjax's cache directory ($LLMJAX_CACHE, default ~/.cache/llmjax)."""
    return os.path.expanduser(os.environ.get("LLMJAX_CACHE") or "~/.cache/llmjax")


def local_copy(path: PathLike, key: str = "path") -> str:
    """A local path holding the file or directory `path`: itself when local, else a copy
    downloaded once into the cache ($LLMJAX_CACHE/remote/<scheme>/<bucket>/<path>). A copy is
    refreshed when the remote object's size or modification time changed."""
    text = check(path, key)
    if not is_remote(text):
        return os.path.expanduser(text)
    source = require(text, key)
    kind = scheme(text)
    target = mirror_path(text)
    stamp = target + ".llmjax-source"
    fs = filesystem(kind)
    signature = repr(sorted((p, i.get("size"), str(i.get("updated") or i.get("mtime") or ""))
                            for p, i in fs.find(text, detail=True, withdirs=False).items()))
    if os.path.exists(stamp) and open(stamp, encoding="utf-8").read() == signature:
        return target
    _remove_local(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = tempfile.mkdtemp(prefix=".download-", dir=os.path.dirname(target))
    try:
        if source.is_dir():
            fs.get(text.rstrip("/") + "/", os.path.join(partial, "x") + "/", recursive=True)
        else:
            fs.get(text, os.path.join(partial, "x"))
        try:
            os.replace(os.path.join(partial, "x"), target)
        except OSError:
            if not os.path.exists(target):  # else another process on this host just fetched it
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=os.path.dirname(target),
                                     prefix=".stamp-", delete=False) as f:
        f.write(signature)
    os.replace(f.name, stamp)  # atomic: a reader sees the old stamp or the new one
    return target


def _remove_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def upload(local: PathLike, remote: PathLike, key: str = "path") -> None:
    """Copy the local file or directory `local` to `remote` (object storage), replacing the
    objects of the same names."""
    text = check(remote, key)
    fs = filesystem(scheme(text))
    local = os.fspath(local)
    if os.path.isdir(local):
        for root, _, files in os.walk(local):
            for name in files:
                relative = os.path.relpath(os.path.join(root, name), local).replace(os.sep, "/")
                fs.put_file(os.path.join(root, name), f"{text.rstrip('/')}/{relative}")
    else:
        fs.put_file(local, text)


@contextlib.contextmanager
def staged_output(path: PathLike, key: str = "path") -> Iterator[str]:
    """A local directory to write `path`'s files into: `path` itself when local (created),
    else a temporary directory uploaded to `path` when the block succeeds (nothing is
    uploaded when it fails, so a half-written export never reaches the bucket)."""
    text = check(path, key)
    if not is_remote(text):
        local = os.path.expanduser(text)
        os.makedirs(local, exist_ok=True)
        yield local
        return
    resolve(text, key)
    staging = tempfile.mkdtemp(prefix="llmjax-upload-")
    try:
        yield staging
        upload(staging, text, key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

