"""A shard set in object storage (``s3://``, ``gs://``, ``http(s)://``), read through fsspec, with a
node-local cache of the shards it fetched.

:class:`RemoteShardStore` is a :class:`.shard_store.ShardStore`: the index files are read whole from
the server each time they are asked for (rank 0 reads them once per run); a shard is fetched whole
into the cache the first time a process of the node opens it, and read from there by ``pread``.

The cache (``data.shard_cache_dir``, a folder per set URL) is shared by every rank and loader
worker of the node, and its contract holds across processes, including killed ones:

- a shard is downloaded to a temporary file and renamed into place only after its size and sha256
  match the index, so a cached shard is always whole and the one indexed (its name carries the
  sha256's first 16 hex digits, so a set whose index changed gets other names, never an old copy);
- one process downloads a shard at a time (an ``fcntl.flock`` on its lock file): a second one that
  needs it waits and then reads the first one's copy. The kernel drops the lock of a killed
  process; its temporary file is removed by the next fetch of that shard, or by the next eviction;
- the shards in the whole cache folder stay within ``data.shard_cache_bytes``: before a download,
  the least recently used shards (by mtime, set on every open) are deleted, never one used in the
  last ``GRACE_S`` seconds nor one being fetched. When that is not enough the download goes ahead
  over budget, with one warning per process. A process that holds a deleted shard open reads on
  (its disk space is freed when it closes it: a process keeps at most ``open_shards`` of the set's
  shards open, 2 x data.shard_window);
- each completed download appends a line to ``fetches.log`` in the set's folder (time, pid, name,
  bytes, seconds): what fetched what, and how often;
- :meth:`RemoteShardStore.prefetch` is the same fetch, asked ahead of a read by a background thread
  (:mod:`.shard_prefetch`); its retries and failures are logged at debug only, since the read that
  follows fetches again and raises the real error. The locks a thread holds when a loader worker
  forks are closed in the child (a lock stays held while any copy of its file is open), so a fork
  never inherits a lock that outlives its holder.

Network errors are retried with backoff for ``DDP_TRAINER_REMOTE_RETRY_S`` seconds in all (30 by
default), then raise one DataError naming the URL and the last error. A missing object, refused
credentials and a shard that no longer matches its index are not retried. Credentials and
endpoints come from the environment as each library reads them (S3: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for a
server other than AWS, read by botocore itself). The store pickles as its URL and cache settings;
each process opens its own client.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import fsspec

from ..errors import DataError

log = logging.getLogger("ddp_trainer")
T = TypeVar("T")

RETRY_ENV = "DDP_TRAINER_REMOTE_RETRY_S"
DEFAULT_RETRY_S = 30.0
DEFAULT_CACHE_BYTES = 100 * 2**30
DEFAULT_OPEN_SHARDS = 8  # open_shards: twice data.shard_window's default
GRACE_S = 10.0  # a shard opened this recently is never evicted: its fetcher is about to open it
CHUNK = 8 * 2**20  # bytes per ranged read of a download
FETCH_LOG = "fetches.log"
EXTRAS = {"s3": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
CREDENTIALS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL_S3 for a "
          "server other than AWS",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service account's key file (or run gcloud auth "
          "application-default login)",
}
_warned: set[str] = set()  # one over-budget warning per process and cache
_held: set[int] = set()  # this process's open lock files, by any thread
# clients inherited through a fork, kept from the garbage collector: collecting one would close its
# session on the parent's event loop, which the child does not run (asyncio prints a traceback)
_inherited: list[Any] = []
_held_lock = threading.Lock()  # held across a fork: a lock file is never half opened or closed then


def _close_inherited_locks() -> None:
    """In a forked child: close the lock files the parent's threads held (the parent's own copies
    keep their locks until it lets go; the child's copies would keep them for the child's lifetime)."""
    global _held_lock
    _held_lock = threading.Lock()
    for fd in list(_held):
        _held.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)


os.register_at_fork(before=lambda: _held_lock.acquire(), after_in_parent=lambda: _held_lock.release(),
                    after_in_child=_close_inherited_locks)


def _open_lock(path: str) -> int:
    with _held_lock:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        _held.add(fd)
    return fd


def _close_lock(fd: int) -> None:
    with _held_lock:
        _held.discard(fd)
        os.close(fd)  # releases the lock


def retry_budget() -> float:
    """Seconds a read keeps retrying network errors (``DDP_TRAINER_REMOTE_RETRY_S``, default 30)."""
    raw = os.environ.get(RETRY_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_RETRY_S
    except ValueError:
        raise DataError(f"{RETRY_ENV}={raw!r} is not a number of seconds; set it to e.g. 30, or unset it") from None


def cache_key(url: str) -> str:
    """The set's folder name in the cache: readable, and unique per URL."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[:60]
    return f"{tail}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def _flock(path: str, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on ``path`` (created if missing); yields False when ``blocking`` is
    off and another open file holds it. Lock files are never deleted: deleting one while a process
    waits on it would let a third process lock a new file of the same name at the same time."""
    try:
        fd = _open_lock(path)
    except FileNotFoundError:  # its folder went with a cleared cache
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = _open_lock(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        _close_lock(fd)


class _LocalWriteError(DataError):
    """The cache folder refused a write: not a network error, never retried."""


class RemoteShardStore:
    """The shard set at ``url``, cached under ``cache_dir`` (see the module docstring)."""

    def __init__(self, url: str, cache_dir: str | os.PathLike[str], cache_bytes: int | None = None,
                 open_shards: int | None = None) -> None:
        self.url = url.rstrip("/")
        self.location = self.url
        self.protocol = self.url.split("://", 1)[0]
        self.cache_dir = str(Path(cache_dir).expanduser())
        self.cache_bytes = int(cache_bytes) if cache_bytes else DEFAULT_CACHE_BYTES
        self.folder = os.path.join(self.cache_dir, cache_key(self.url))
        # a process keeps at most this many of the set's shards open (ShardIndex): an evicted shard
        # still open keeps its disk space, so fewer open files keep the cache near its budget
        self.open_shards = int(open_shards) if open_shards else DEFAULT_OPEN_SHARDS
        extra = EXTRAS.get(self.protocol, "s3")
        try:
            fsspec.get_filesystem_class(self.protocol)  # imports s3fs / gcsfs / aiohttp: no network yet
        except (ImportError, ValueError) as exc:
            raise DataError(f"data.root={url} needs object storage support, which cannot be loaded ({exc}); "
                            f"install it with pip install -e \".[{extra}]\"") from None
        self._fs: Any = None
        self._root = ""
        self._pid = -1

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteShardStore, (self.url, self.cache_dir, self.cache_bytes, self.open_shards))

    def __repr__(self) -> str:
        return f"RemoteShardStore({self.url!r}, cache {self.folder!r})"

    # -- the server ---------------------------------------------------------------------------

    def _filesystem(self) -> Any:
        """This process's client (a forked loader worker makes its own: an async client's event loop
        and connections do not survive a fork)."""
        if self._fs is None or self._pid != os.getpid():
            if self._fs is not None:  # a forked child's copy of its parent's client: never closed here
                _inherited.append(self._fs)
            options: dict[str, Any] = {"skip_instance_cache": True}
            if self.protocol == "s3":
                # one attempt per call inside botocore: the retries and their time budget are ours
                options["config_kwargs"] = {"retries": {"max_attempts": 1, "mode": "standard"},
                                            "connect_timeout": 10, "read_timeout": 60}
            fs, root = fsspec.core.url_to_fs(self.url, **options)
            if hasattr(fs, "retries"):
                fs.retries = 1  # s3fs's own retry loop, likewise
            self._fs, self._root, self._pid = fs, root.rstrip("/"), os.getpid()
        return self._fs

    def _path(self, name: str) -> str:
        self._filesystem()
        return f"{self._root}/{name}"

    def _fatal(self, exc: BaseException, url: str) -> DataError | None:
        """The DataError for an error that retrying cannot mend; None for one worth retrying."""
        names = {c.__name__ for c in type(exc).__mro__}
        status = getattr(exc, "status", None) or getattr(exc, "code", None)
        if isinstance(exc, FileNotFoundError) or status == 404:
            return DataError(f"'{url}' does not exist (no such bucket or object: {_first_line(exc)}); check "
                             f"data.root={self.url} (the folder 'ddp-trainer shard' wrote, uploaded whole)")
        if isinstance(exc, PermissionError) or status in (401, 403) or names & {
                "NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "RefreshError"}:
            how = CREDENTIALS.get(self.protocol, "check that the URL may be read")
            return DataError(f"'{url}' cannot be read: no access ({_first_line(exc)}); {how}")
        if isinstance(exc, (ValueError, TypeError)):
            return DataError(f"'{url}' cannot be read ({_first_line(exc)}); check data.root={self.url} and the "
                             f"endpoint settings")
        return None

    def _retrying(self, url: str, call: Callable[[Any], T], quiet: bool = False) -> T:
        """``call(filesystem)``, retried with backoff on network errors within the retry budget
        (``quiet``: the first retry logged at debug, not as a warning)."""
        budget, t0, delay, tries = retry_budget(), time.monotonic(), 0.5, 0
        while True:
            tries += 1
            try:
                return call(self._filesystem())
            except DataError:
                raise
            except Exception as exc:  # noqa: BLE001 - every client library has its own error family
                fatal = self._fatal(exc, url)
                if fatal is not None:
                    raise fatal from None
                spent = time.monotonic() - t0
                if spent >= budget:
                    raise DataError(f"cannot read '{url}' after {tries} tries in {spent:.0f} s ({_first_line(exc)}); "
                                    f"check the network and the endpoint, then run the same command again (it "
                                    f"resumes from the last checkpoint)") from None
                if tries == 1:
                    log.log(logging.DEBUG if quiet else logging.WARNING,
                            "object storage: reading %s failed (%s); retrying for up to %.0f s (%s)", url,
                                _first_line(exc), budget, RETRY_ENV)
                time.sleep(min(delay, budget - spent))
                delay = min(delay * 2, 8.0)
                self._fs = None  # a fresh client: the old one's pool may hold dead connections

    def read_small(self, name: str) -> bytes:
        url = f"{self.url}/{name}"
        return self._retrying(url, lambda fs: fs.cat_file(self._path(name)))

    def exists(self, name: str) -> bool:
        url = f"{self.url}/{name}"
        try:
            return bool(self._retrying(url, lambda fs: fs.exists(self._path(name))))
        except DataError as exc:
            if "does not exist" in exc.message:
                return False
            raise

    # -- the cache -----------------------------------------------------------------------------

    def cached_name(self, name: str, sha256: str) -> str:
        """The file name shard ``name`` of that sha256 has in the set's cache folder."""
        return f"{name.replace('/', '%2F')}.{sha256[:16]}"

    def prefetch(self, name: str, size: int, sha256: str) -> None:
        """Fetch shard ``name`` into the cache ahead of its first read (as :meth:`shard_path`, whose
        locking makes a reader that needs it meanwhile wait for this copy); marks it used now, so
        that it stays through the eviction's grace period. Retries are logged at debug only."""
        self.shard_path(name, size, sha256, quiet=True)

    def shard_path(self, name: str, size: int, sha256: str, quiet: bool = False) -> str:
        """The cached copy of shard ``name`` (fetched first when missing); marks it used now."""
        cached = self.cached_name(name, sha256)
        path = os.path.join(self.folder, cached)
        if self._use(path, size):
            return path
        locks = os.path.join(self.folder, ".locks")
        try:
            os.makedirs(locks, exist_ok=True)
        except OSError as exc:
            raise DataError(f"the shard cache '{self.folder}' cannot be made ({exc.strerror}); set "
                            f"data.shard_cache_dir to a writable node-local folder") from None
        with _flock(os.path.join(locks, cached + ".lock")):
            if self._use(path, size):  # another process fetched it while this one waited
                return path
            for entry in os.scandir(self.folder):  # this process holds the lock: any part is a dead fetch's
                if entry.name.startswith(cached + ".part-"):
                    _unlink(entry.path)
            self._make_room(size)
            self._fetch(name, size, sha256, path, quiet)
        return path

    @staticmethod
    def _use(path: str, size: int) -> bool:
        """True when ``path`` is a cached shard of ``size`` bytes; its mtime becomes now (its use)."""
        try:
            if os.stat(path).st_size != size:
                return False
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    def _fetch(self, name: str, size: int, sha256: str, path: str, quiet: bool = False) -> None:
        """Download shard ``name`` to a temporary file, check it against the index, publish it."""
        url = f"{self.url}/{name}"
        part = f"{path}.part-{os.getpid()}"
        got = {"done": 0, "hash": hashlib.sha256()}
        t0 = time.monotonic()

        def changed(what: str) -> DataError:
            _unlink(part)
            return DataError(f"shard '{url}' changed since its index was written ({what}); restore the shard, "
                             f"or write the set's index again (ddp-trainer shard --index-only) and upload it")

        def attempt(fs: Any) -> None:
            remote = self._path(name)
            listed = fs.size(remote)
            if listed is not None and int(listed) != size:
                raise changed(f"it is {listed} bytes, the index says {size}")
            # the size known already spares the file object its own metadata request
            known = {"size": size} if listed is not None else {}
            with fs.open(remote, "rb", block_size=CHUNK, cache_type="none", **known) as src:
                if got["done"]:
                    try:  # resume where the last attempt stopped
                        src.seek(got["done"])
                    except (ValueError, OSError, NotImplementedError):
                        got["done"], got["hash"] = 0, hashlib.sha256()
                try:
                    dst = open(part, "r+b" if got["done"] else "wb")
                    dst.truncate(got["done"])
                    dst.seek(got["done"])
                except OSError as exc:
                    raise self._write_error(part, exc) from None
                with dst:
                    while got["done"] < size:
                        chunk = src.read(min(CHUNK, size - got["done"]))
                        if not chunk:
                            raise changed(f"it ended after {got['done']} of the {size} bytes its index says")
                        try:
                            dst.write(chunk)
                        except OSError as exc:
                            raise self._write_error(part, exc) from None
                        got["hash"].update(chunk)
                        got["done"] += len(chunk)
                    if src.read(1):
                        raise changed(f"it holds more than the {size} bytes its index says")

        try:
            self._retrying(url, attempt, quiet)
        except BaseException:
            _unlink(part)
            raise
        digest = got["hash"].hexdigest()
        if digest != sha256:
            raise changed(f"its sha256 is {digest[:16]}..., the index says {sha256[:16]}...")
        os.replace(part, path)
        line = f"{time.time():.3f} {os.getpid()} {name} {size} {time.monotonic() - t0:.3f}\n"
        with contextlib.suppress(OSError):
            fd = os.open(os.path.join(self.folder, FETCH_LOG), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def _write_error(self, part: str, exc: OSError) -> DataError:
        return _LocalWriteError(f"the shard cache cannot write '{part}' ({exc.strerror}); free space there, or set "
                                f"data.shard_cache_dir to another node-local folder")

    def _make_room(self, need: int) -> None:
        """Delete least recently used shards of the whole cache folder until ``need`` more bytes fit
        in ``data.shard_cache_bytes`` (see the module docstring for what is never deleted)."""
        with _flock(os.path.join(self.cache_dir, ".evict.lock")):
            now, total, shards = time.time(), 0, []
            for folder in _subfolders(self.cache_dir):
                for entry in os.scandir(folder):
                    if entry.name.startswith(".") or entry.name == FETCH_LOG or not entry.is_file():
                        continue
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    base, sep, _ = entry.name.partition(".part-")
                    lock = os.path.join(folder, ".locks", base + ".lock")
                    if sep:  # a download's temporary file: a live fetch holds the shard's lock
                        with _flock(lock, blocking=False) as free:
                            if free:
                                _unlink(entry.path)
                                continue
                        total += st.st_size
                        continue
                    total += st.st_size
                    shards.append((st.st_mtime, entry.path, st.st_size, lock))
            over = total + need - self.cache_bytes
            for mtime, path, size, lock in sorted(shards):
                if over <= 0 or now - mtime < GRACE_S:
                    break  # sorted oldest first: every later one is in its grace period too
                with _flock(lock, blocking=False) as free:
                    if free and self._still_unused(path, mtime):
                        _unlink(path)
                        over -= size
            if over > 0 and self.cache_dir not in _warned:
                _warned.add(self.cache_dir)
                log.warning("data.shard_cache_bytes=%d: the shard cache '%s' holds only shards used in the last "
                            "%.0f s or being fetched; it goes over its budget by %d bytes (give it room for a few "
                            "windows of shards per process of the node)", self.cache_bytes, self.cache_dir,
                            GRACE_S, over)

    @staticmethod
    def _still_unused(path: str, mtime: float) -> bool:
        """A shard not opened since the scan (one opened since has a newer mtime: keep it)."""
        try:
            return os.stat(path).st_mtime == mtime
        except FileNotFoundError:
            return False


def _subfolders(root: str) -> list[str]:
    try:
        return [e.path for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    except FileNotFoundError:
        return []


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
