"""Local and S3 paths for every data or output argument (boto3; kept at the edge of segcore).

Any data or output path may be ``s3://bucket/prefix``. Inputs are downloaded into a local cache
and given to the rest of segcore as ordinary folders; outputs are written to a local staging
folder and uploaded when the step succeeds. The core (data, models, training) never sees S3.

- Endpoint: ``--s3-endpoint`` (``configure(endpoint=...)``), else boto3's own
  ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` / AWS config (AWS itself when unset).
- Credentials: only boto3's standard chain (environment, ``~/.aws``, instance/pod roles); segcore
  never takes them as arguments and never logs them.
- Retries: botocore's ``standard`` mode (``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` override it);
  uploads above 8 MiB are multipart with boto3's ``TransferConfig``.
- Downloads are checked against the listing (size always, MD5 ETag when the object has one or was
  uploaded with segcore's part size) and cached under ``$SEGCORE_CACHE/s3`` (default
  ``~/.cache/segcore/s3``), keyed by endpoint, bucket, key and ETag: a second run downloads nothing.
- Keys that would leave the target folder (``..``, ``.``, empty or absolute segments) are refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from segcore.errors import SegcoreError

log = logging.getLogger(__name__)

SCHEME = "s3://"
PART_SIZE = 8 * 1024 * 1024  # multipart threshold and part size (S3's minimum part is 5 MiB)
# Written last on upload, in this order, so a prefix never looks finished before it is: a step
# killed mid-upload leaves no manifest.json / model.json behind, and last.pt precedes metrics.jsonl
# as it does on local disk.
FINISH_ORDER = ("last.pt", "metrics.jsonl", "manifest.json", "model.json")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CREDENTIAL_CODES = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
)
_SKIP_UPLOAD = re.compile(r"(\.tmp|\.partial.*)$|^\.")  # temporary files of atomic writes

_endpoint_override: str | None = None
_client = None
_client_lock = threading.Lock()
_md5_cache: dict[tuple[str, int, int], str] = {}


# ---------------------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # no leading slash; "" for the whole bucket

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"

    def child(self, relative: str) -> S3Uri:
        prefix = self.key.rstrip("/")
        return S3Uri(self.bucket, f"{prefix}/{relative}" if prefix else relative)

    @property
    def prefix(self) -> str:
        """The key as a folder prefix ('' or ending in '/')."""
        return self.key.rstrip("/") + "/" if self.key.strip("/") else ""


def is_s3(path: str | os.PathLike | None) -> bool:
    """True for anything that claims the s3 scheme (malformed ones then fail in ``parse_s3_uri``)."""
    return isinstance(path, str) and path[:3].lower() == "s3:"


def parse_s3_uri(uri: str) -> S3Uri:
    """``s3://bucket/prefix`` -> S3Uri; a SegcoreError naming the problem otherwise."""
    fix = "expected s3://BUCKET/PREFIX"
    if not is_s3(uri) or uri[:5].lower() != SCHEME:
        raise SegcoreError(f"malformed S3 URI '{uri}': {fix}")
    rest = uri[5:]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise SegcoreError(f"malformed S3 URI '{uri}': no bucket name; {fix}")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise SegcoreError(
            f"malformed S3 URI '{uri}': '{bucket}' is not a valid bucket name "
            "(3-63 lowercase letters, digits, dots or hyphens)"
        )
    key = key.lstrip("/") if key.startswith("/") and not key.strip("/") else key
    parts = key.rstrip("/").split("/") if key.strip("/") else []
    if any(p in ("", ".", "..") for p in parts) or "\x00" in key:
        raise SegcoreError(f"malformed S3 URI '{uri}': empty, '.' or '..' path segments are not allowed")
    return S3Uri(bucket, key)


def safe_relative(key: str, prefix: str) -> str:
    """The part of ``key`` below ``prefix`` as a relative path that stays inside the target folder;
    a SegcoreError for keys that would escape it (``..``, ``.``, empty segments, absolute)."""
    rel = key[len(prefix) :]
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or any(p in ("", ".", "..") for p in parts):
        raise SegcoreError(
            f"refusing S3 key '{key}': it would be written outside the target folder "
            "(absolute path or empty, '.' or '..' segments); rename the object"
        )
    return rel


# ---------------------------------------------------------------------------------- client


def add_storage_arguments(parser) -> None:
    """``--s3-endpoint``; credentials are deliberately not arguments (environment / AWS config)."""
    g = parser.add_argument_group("S3 storage (credentials from the environment or AWS config only)")
    g.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3-compatible endpoint, e.g. http://minio:9000 (default: AWS_ENDPOINT_URL, else AWS)",
    )


def configure(endpoint: str | None = None) -> None:
    """Use ``endpoint`` for every S3 request of this process (``--s3-endpoint``); None: boto3's default."""
    global _endpoint_override, _client
    with _client_lock:
        if endpoint != _endpoint_override:
            _endpoint_override = endpoint or None
            _client = None


def reset_client() -> None:
    """Forget the client, so the next request reads the environment (credentials, endpoint) again."""
    global _client
    with _client_lock:
        _client = None


def configure_from_args(args) -> None:
    configure(getattr(args, "s3_endpoint", None))


def _endpoint_env() -> str | None:
    return _endpoint_override or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def client():
    """One boto3 S3 client per process (thread-safe), with retries and timeouts set."""
    global _client
    with _client_lock:
        if _client is None:
            import boto3
            from botocore.config import Config

            endpoint = _endpoint_env()
            config = Config(
                retries={
                    "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                    "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "6")),
                },
                connect_timeout=10,
                read_timeout=120,
                max_pool_connections=16,
                # S3-compatible servers (MinIO, SeaweedFS, Ceph) want path-style addressing
                s3={"addressing_style": "path"} if endpoint else None,
            )
            for name in ("botocore", "boto3", "s3transfer", "urllib3"):  # their INFO lines are noise here
                if logging.getLogger(name).level == logging.NOTSET:
                    logging.getLogger(name).setLevel(logging.WARNING)
            _client = boto3.session.Session().client("s3", endpoint_url=_endpoint_override, config=config)
        return _client


def endpoint_label() -> str:
    """Where requests go, for messages (never carries credentials)."""
    url = client().meta.endpoint_url
    return re.sub(r"//[^/@]*@", "//", url)


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=4)


def _error(exc: BaseException, uri: S3Uri | str) -> SegcoreError:
    """A one-line SegcoreError for a boto3/botocore failure, naming the URI and the fix."""
    from botocore import exceptions as bx

    where = endpoint_label()
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return SegcoreError(
            f"no S3 credentials found for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE / ~/.aws/credentials)"
        )
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ConnectionClosedError):
        return SegcoreError(
            f"cannot reach the S3 endpoint {where} for {uri}: check --s3-endpoint / AWS_ENDPOINT_URL "
            "and that the server is running"
        )
    if isinstance(exc, bx.ReadTimeoutError | bx.ConnectionError):
        return SegcoreError(f"S3 endpoint {where} stopped answering for {uri} ({type(exc).__name__}); try again")
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        bucket = uri.bucket if isinstance(uri, S3Uri) else str(uri)
        if code == "NoSuchBucket":
            return SegcoreError(f"bucket '{bucket}' does not exist at {where}: create it or fix the URI {uri}")
        if code in _CREDENTIAL_CODES:
            return SegcoreError(
                f"S3 at {where} rejected the credentials ({code}) for {uri}: check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or the AWS profile)"
            )
        if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            return SegcoreError(f"access denied to {uri} at {where} ({code or 403}): the credentials lack permission")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return SegcoreError(f"{uri} does not exist at {where}")
        message = " ".join(str(err.get("Message", "")).split())[:200]
        return SegcoreError(f"S3 request for {uri} failed at {where}: {code or status} {message}".strip())
    if isinstance(exc, bx.BotoCoreError):
        return SegcoreError(f"S3 request for {uri} failed at {where}: {' '.join(str(exc).split())[:200]}")
    return SegcoreError(f"S3 transfer for {uri} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")


def _boto_errors() -> tuple[type[BaseException], ...]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, Boto3Error)


@contextlib.contextmanager
def _translated(uri: S3Uri | str) -> Iterator[None]:
    try:
        yield
    except SegcoreError:
        raise
    except _boto_errors() as exc:
        raise _error(exc, uri) from None


# ---------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str  # without quotes


def _list(uri: S3Uri) -> list[S3Object]:
    """Objects under the folder ``uri`` (directory markers left out)."""
    out: list[S3Object] = []
    with _translated(uri):
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=uri.prefix)
        for page in pages:
            for o in page.get("Contents", []):
                if o["Key"].endswith("/"):
                    continue
                out.append(S3Object(o["Key"], int(o["Size"]), str(o.get("ETag", "")).strip('"')))
    return out


def _head(uri: S3Uri) -> S3Object | None:
    from botocore.exceptions import ClientError

    if not uri.key or uri.key.endswith("/"):
        return None
    try:
        h = client().head_object(Bucket=uri.bucket, Key=uri.key)
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            # a missing bucket also answers 404 to HEAD: tell the two apart
            check_bucket(uri)
            return None
        raise _error(exc, uri) from None
    except _boto_errors() as exc:
        raise _error(exc, uri) from None
    return S3Object(uri.key, int(h["ContentLength"]), str(h.get("ETag", "")).strip('"'))


def check_bucket(uri: str | S3Uri) -> S3Uri:
    """Fail early, with a one-line error, on a malformed URI, a missing bucket, bad credentials or an
    unreachable endpoint."""
    uri = parse_s3_uri(uri) if isinstance(uri, str) else uri
    with _translated(uri):
        client().list_objects_v2(Bucket=uri.bucket, Prefix=uri.prefix, MaxKeys=1)
    return uri


def exists(uri: str | S3Uri) -> bool:
    """True when ``uri`` is an object or a non-empty folder."""
    uri = parse_s3_uri(uri) if isinstance(uri, str) else uri
    return _head(uri) is not None or bool(_list_one(uri))


def _list_one(uri: S3Uri) -> bool:
    with _translated(uri):
        page = client().list_objects_v2(Bucket=uri.bucket, Prefix=uri.prefix, MaxKeys=1)
    return bool(page.get("Contents"))


# ---------------------------------------------------------------------------------- checksums


def _file_md5s(path: Path, part_size: int | None) -> str:
    """The ETag S3 gives ``path``: MD5 (single part) or MD5 of part MD5s + '-N' (multipart)."""
    whole = hashlib.md5(usedforsecurity=False)
    parts: list[bytes] = []
    with open(path, "rb") as f:
        if part_size is None:
            for block in iter(lambda: f.read(1 << 20), b""):
                whole.update(block)
            return whole.hexdigest()
        while True:
            chunk = f.read(part_size)
            if not chunk:
                break
            parts.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    combined = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()
    return f"{combined}-{len(parts)}"


def local_etag(path: Path, size: int | None = None) -> str:
    """The ETag segcore's own upload of ``path`` produces (cached per path, size and mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _md5_cache:
        multipart = st.st_size >= PART_SIZE
        _md5_cache[key] = _file_md5s(path, PART_SIZE if multipart else None)
    return _md5_cache[key]


def _verify(path: Path, obj: S3Object, uri: S3Uri) -> None:
    """Size always; the ETag when it is an MD5 (single part) or a multipart ETag of segcore's part
    size. Other ETags (SSE-KMS objects, other part sizes) are checked by size only."""
    size = path.stat().st_size
    if size != obj.size:
        raise SegcoreError(f"download of {uri} is {size} bytes, the object {obj.size}: incomplete transfer; try again")
    etag = obj.etag.lower()
    if re.fullmatch(r"[0-9a-f]{32}", etag):
        got = _file_md5s(path, None)
    elif re.fullmatch(r"[0-9a-f]{32}-\d+", etag):
        n = int(etag.rsplit("-", 1)[1])
        if -(-size // PART_SIZE) != n:
            return  # uploaded with another part size: size is what can be checked
        got = _file_md5s(path, PART_SIZE)
    else:
        return
    if got != etag:
        # SSE-KMS / SSE-C objects have non-MD5 ETags that still look like MD5s: check before failing
        with _translated(uri):
            head = client().head_object(Bucket=uri.bucket, Key=obj.key)
        if head.get("ServerSideEncryption") == "aws:kms" or head.get("SSECustomerAlgorithm"):
            return
        raise SegcoreError(f"download of {uri} does not match its ETag (got {got}, expected {etag}); try again")


# ---------------------------------------------------------------------------------- download


def cache_root() -> Path:
    """``$SEGCORE_CACHE/s3``, default ``$XDG_CACHE_HOME/segcore/s3`` or ``~/.cache/segcore/s3``."""
    base = os.environ.get("SEGCORE_CACHE")
    if base:
        return Path(base).expanduser() / "s3"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "segcore" / "s3"


def _endpoint_slug() -> str:
    url = endpoint_label()
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", url.split("://", 1)[-1]).strip("_") or "default"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_one(obj: S3Object, bucket: str, dest: Path) -> None:
    uri = S3Uri(bucket, obj.key)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}-{threading.get_ident()}")
    try:
        for attempt in (1, 2):
            with _translated(uri):
                client().download_file(bucket, obj.key, str(tmp), Config=_transfer_config())
            try:
                _verify(tmp, obj, uri)
                break
            except SegcoreError:
                if attempt == 2:
                    raise
                log.warning("%s: checksum or size mismatch, downloading again", uri)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _resolve(uri: S3Uri) -> tuple[list[S3Object], str, bool]:
    """The objects ``uri`` names: (objects, prefix they are relative to, is_single_file)."""
    objects = _list(uri)
    if objects:
        return objects, uri.prefix, False
    single = _head(uri)
    if single is not None:
        prefix = uri.key.rsplit("/", 1)[0] + "/" if "/" in uri.key else ""
        return [single], prefix, True
    check_bucket(uri)
    raise SegcoreError(f"no object or folder {uri} at {endpoint_label()}: check the path")


def _fetch(objects: list[S3Object], bucket: str, prefix: str, root: Path, index: dict) -> tuple[int, int]:
    """Download into ``root`` what ``index`` (key -> [etag, size, mtime_ns]) does not already hold."""
    todo: list[tuple[S3Object, Path]] = []
    for obj in objects:
        dest = root / safe_relative(obj.key, prefix)
        if not dest.resolve().is_relative_to(root.resolve()):
            raise SegcoreError(f"refusing S3 key '{obj.key}': it resolves outside {root}")
        known = index.get(obj.key)
        if known and dest.is_file():
            st = dest.stat()
            if known == [obj.etag, obj.size, st.st_mtime_ns] and st.st_size == obj.size:
                continue
        todo.append((obj, dest))
    if todo:
        with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
            list(pool.map(lambda job: _download_one(job[0], bucket, job[1]), todo))
        for obj, dest in todo:
            index[obj.key] = [obj.etag, obj.size, dest.stat().st_mtime_ns]
    return len(todo), len(objects) - len(todo)


def local_input(uri: str | os.PathLike) -> Path:
    """A local path for a data argument: local paths pass through; ``s3://bucket/prefix`` (a folder
    or a single object) is downloaded into the cache, reusing files whose ETag has not changed."""
    if not is_s3(uri):
        return Path(uri)
    s3 = parse_s3_uri(str(uri))
    objects, prefix, single = _resolve(s3)
    bucket_root = cache_root() / _endpoint_slug() / s3.bucket
    with _locked(bucket_root.parent / f".{s3.bucket}.lock"):
        index_path = bucket_root.parent / f".{s3.bucket}.index.json"
        try:
            index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            index = {}
        root = bucket_root / prefix.rstrip("/") if prefix else bucket_root
        fetched, cached = _fetch(objects, s3.bucket, prefix, root, index)
        if not single:  # drop files of objects deleted since the last download
            listed = {safe_relative(o.key, prefix) for o in objects}
            if root.is_dir():
                for path in root.rglob("*"):
                    if path.is_file() and path.relative_to(root).as_posix() not in listed:
                        path.unlink()
                        index.pop(f"{prefix}{path.relative_to(root).as_posix()}", None)
        tmp = index_path.with_name(index_path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)
    log.info("%s: %d files downloaded, %d from the cache (%s)", s3, fetched, cached, root)
    if single:
        return root / safe_relative(objects[0].key, prefix)
    return root


def download(uri: str | S3Uri, target: str | Path) -> int:
    """Copy the folder ``uri`` into ``target`` (no cache); returns the number of files."""
    s3 = parse_s3_uri(uri) if isinstance(uri, str) else uri
    objects = _list(s3)
    fetched, _ = _fetch(objects, s3.bucket, s3.prefix, Path(target), {})
    log.info("%s: %d files downloaded to %s", s3, fetched, target)
    return fetched


# ---------------------------------------------------------------------------------- upload


def _upload_one(path: Path, uri: S3Uri) -> None:
    with _translated(uri):
        client().upload_file(str(path), uri.bucket, uri.key, Config=_transfer_config())


def sync_up(
    local_dir: str | Path,
    uri: str | S3Uri,
    *,
    last: Sequence[str] = FINISH_ORDER,
    delete: bool = False,
    exclude: Sequence[str] = (),
) -> int:
    """Upload the files of ``local_dir`` that differ from what is under ``uri`` (size and ETag);
    files named in ``last`` go after all others, in that order. ``delete`` removes remote objects
    that have no local file. ``exclude``: top-level names to leave out. Returns the files uploaded."""
    s3 = parse_s3_uri(uri) if isinstance(uri, str) else uri
    local_dir = Path(local_dir)
    remote = {o.key: o for o in _list(s3)}
    files = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir)
        if rel.parts[0] in exclude or any(_SKIP_UPLOAD.search(part) for part in rel.parts):
            continue
        files.append((rel.as_posix(), path))
    rank = {name: i for i, name in enumerate(last)}
    files.sort(key=lambda f: (rank.get(f[0], -1), f[0]))
    first = [f for f in files if f[0] not in rank]
    later = [f for f in files if f[0] in rank]
    changed = []
    for rel, path in first + later:
        target = s3.child(rel)
        obj = remote.get(target.key)
        if obj and obj.size == path.stat().st_size and obj.etag.lower() == local_etag(path):
            continue
        changed.append((rel, path, target))
    changed_first = [c for c in changed if c[0] not in rank]
    if changed_first:
        with ThreadPoolExecutor(max_workers=min(4, len(changed_first))) as pool:
            list(pool.map(lambda c: _upload_one(c[1], c[2]), changed_first))
    for rel, path, target in changed:
        if rel in rank:
            _upload_one(path, target)
    if delete:
        keep = {s3.child(rel).key for rel, _ in files}
        stale = [k for k in remote if k not in keep]
        with _translated(s3):
            for i in range(0, len(stale), 1000):
                client().delete_objects(
                    Bucket=s3.bucket, Delete={"Objects": [{"Key": k} for k in stale[i : i + 1000]], "Quiet": True}
                )
    if changed:
        log.info("%s: uploaded %d of %d files", s3, len(changed), len(files))
    return len(changed)


@contextlib.contextmanager
def local_output(
    uri: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: bool = False,
    exist_ok: bool = False,
    last: Sequence[str] = FINISH_ORDER,
) -> Iterator[Path]:
    """A local folder to write an output to. For a local path: the path itself. For ``s3://``:
    a staging folder (not yet created, unless ``resume`` downloaded the existing prefix into it),
    uploaded when the block succeeds and removed in any case, so a failure uploads nothing.

    An existing non-empty prefix is refused (as an existing folder is) unless ``overwrite`` (objects
    not rewritten are deleted after the upload), ``resume`` (it is downloaded first) or ``exist_ok``
    (it is left as it is and same-named files are replaced)."""
    if not is_s3(uri):
        yield Path(uri)
        return
    s3 = check_bucket(str(uri))
    if not (overwrite or resume or exist_ok) and _list_one(s3):
        raise SegcoreError("output already exists; give a new prefix or --overwrite", s3)
    staging = Path(tempfile.mkdtemp(prefix="segcore-out-"))
    target = staging / (s3.key.rstrip("/").rsplit("/", 1)[-1] or s3.bucket)
    try:
        if resume and _list_one(s3):
            download(s3, target)
        yield target
        if target.exists():
            sync_up(target, s3, last=last, delete=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def display(path: str | os.PathLike, local: str | Path) -> str:
    """What to show the user for an output: the URI for S3, the local path otherwise."""
    return str(path) if is_s3(path) else str(local)


def local_model(uri: str | os.PathLike) -> Path:
    """``local_input`` for a model argument: an ``s3://.../model.xml`` brings its folder (the .bin
    and side files) along; bundles and IR folders are prefixes anyway."""
    if is_s3(uri) and str(uri).lower().endswith(".xml"):
        parent, _, name = str(uri).rpartition("/")
        return local_input(parent) / name
    return local_input(uri)
