"""rosbag2 reading and writing (sqlite3 and mcap) on top of ``rosbags``, with rclpy messages.

Messages travel as raw CDR; :func:`serialize` / :func:`deserialize` turn them into the rclpy
message classes the node uses (rosbags' CDR and Fast CDR are interchangeable; only the padding
bytes differ, so compare messages, not bytes).

* :class:`BagReader` opens a bag directory (``metadata.yaml`` + ``.db3``/``.mcap``) or a single
  ``.db3``/``.mcap`` file and turns every failure, including corruption found halfway
  through, into a :class:`BagError` with a message meant for the user.
* :class:`BagWriter` writes rosbag2 version 9 (what ``ros2 bag play`` reads on Jazzy/Kilted)
  into a hidden sibling directory and renames it to the requested path only on success, so a
  failed run never leaves a bag that looks complete.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from rosbags.interfaces import Connection, ConnectionExtRosbag2, MessageDefinitionFormat
from rosbags.rosbag2 import Reader, StoragePlugin, Writer

from gsva_ros.bag.typestore import definition

STORAGES: tuple[str, ...] = ("sqlite3", "mcap")
_PLUGINS = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
_BAG_FILE_SUFFIXES = {".db3", ".mcap", ".yaml", ".zstd", ".db3-shm", ".db3-wal"}


class BagError(RuntimeError):
    """A bag that cannot be read or written; the message is meant for the user."""


@dataclass(frozen=True)
class TopicInfo:
    """One topic of a bag: name, message type (``pkg/msg/Name``) and message count."""

    name: str
    msgtype: str
    count: int


@dataclass(frozen=True)
class BagMessage:
    """One message as stored: topic, type, receive timestamp (ns) and raw CDR bytes."""

    topic: str
    msgtype: str
    timestamp: int
    raw: bytes
    connection: Connection


# ------------------------------------------------------------------------------- rclpy messages
def message_class(msgtype: str) -> type:
    """``"sensor_msgs/msg/Image"`` → the rclpy message class (ImportError if not installed)."""
    parts = msgtype.split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"not a ROS 2 message type name: {msgtype!r}")
    pkg, kind, name = parts
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


def serialize(msg: Any) -> bytes:
    """rclpy message → CDR bytes."""
    from rclpy.serialization import serialize_message

    return serialize_message(msg)


def deserialize(raw: bytes, msgtype: str | type) -> Any:
    """CDR bytes → rclpy message of ``msgtype`` (a type name or a message class)."""
    from rclpy.serialization import deserialize_message

    cls = message_class(msgtype) if isinstance(msgtype, str) else msgtype
    return deserialize_message(bytes(raw), cls)


def stamp_ns(header: Any) -> int:
    """``std_msgs/Header`` stamp → integer nanoseconds."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def set_stamp(header: Any, ns: int) -> None:
    """Set a ``std_msgs/Header`` stamp from integer nanoseconds."""
    header.stamp.sec, header.stamp.nanosec = divmod(int(ns), 1_000_000_000)


# ------------------------------------------------------------------------------------- reading
class BagReader:
    """Read-only access to a rosbag2 bag (directory or single ``.db3``/``.mcap`` file).

    Use as a context manager::

        with BagReader("in_bag") as bag:
            for m in bag.messages(["/camera/image_raw"]):
                image = deserialize(m.raw, m.msgtype)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._reader: Reader | None = None

    def open(self) -> BagReader:
        if not self.path.exists():
            raise BagError(f"bag {self.path} does not exist")
        try:
            reader = Reader(self.path)
            reader.open()
        except Exception as exc:  # noqa: BLE001 - rosbags, sqlite, mcap and OS errors alike
            raise BagError(f"cannot read bag {self.path}: {_describe(exc)}") from exc
        self._reader = reader
        return self

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                reader.close()
            except Exception:  # noqa: BLE001 - closing a broken bag must not hide the cause
                pass

    def __enter__(self) -> BagReader:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def reader(self) -> Reader:
        if self._reader is None:
            raise BagError(f"bag {self.path} is not open")
        return self._reader

    @property
    def storage(self) -> str:
        """``"sqlite3"`` or ``"mcap"`` (from the data files)."""
        files = [self.path] if self.path.is_file() else list(self.path.iterdir())
        # ".db3" or ".db3.zstd" (file-compressed bags keep the storage suffix first)
        suffixes = {s for f in files for s in f.suffixes}
        return "sqlite3" if ".db3" in suffixes and ".mcap" not in suffixes else "mcap"

    @property
    def connections(self) -> list[Connection]:
        return list(self.reader.connections)

    @property
    def topics(self) -> dict[str, TopicInfo]:
        """Topic name → :class:`TopicInfo` (counts summed over connections)."""
        out: dict[str, TopicInfo] = {}
        for c in self.reader.connections:
            prev = out.get(c.topic)
            count = c.msgcount + (prev.count if prev else 0)
            out[c.topic] = TopicInfo(c.topic, c.msgtype, count)
        return out

    @property
    def message_count(self) -> int:
        return int(self.reader.message_count)

    @property
    def start_time(self) -> int:
        return int(self.reader.start_time)

    @property
    def end_time(self) -> int:
        return int(self.reader.end_time)

    def messages(self, topics: Iterable[str] | None = None) -> Iterator[BagMessage]:
        """Messages in timestamp order, optionally only those of ``topics``.

        Corruption found while reading raises :class:`BagError`.
        """
        wanted = None if topics is None else set(topics)
        conns = [c for c in self.reader.connections if wanted is None or c.topic in wanted]
        if not conns:
            return
        try:
            for conn, timestamp, raw in self.reader.messages(connections=conns):
                yield BagMessage(conn.topic, conn.msgtype, int(timestamp), raw, conn)
        except BagError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. sqlite "malformed", truncated mcap
            raise BagError(f"cannot read bag {self.path}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------- writing
def is_bag_dir(path: Path) -> bool:
    """True for a directory that only holds rosbag2 files (safe to replace with --overwrite)."""
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    if not entries:
        return True
    return (path / "metadata.yaml").is_file() and all(
        e.is_file() and e.suffix in _BAG_FILE_SUFFIXES for e in entries
    )


def check_output_path(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate an output bag path before any work is done; raises :class:`BagError`."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise BagError(f"output {out} already exists (pass --overwrite to replace it)")
        if not is_bag_dir(out):
            raise BagError(f"output {out} exists and is not a rosbag2 bag; not replacing it")
    return out


class BagWriter:
    """Write a rosbag2 (version 9) bag atomically.

    Everything goes to ``.<name>.partial-<pid>/<name>`` next to ``out``; :meth:`commit` (called
    by ``__exit__`` when no exception is pending) closes the bag and renames it to ``out``;
    :meth:`abort` removes it. Topics are declared with :meth:`add_topic` (our types and those
    of the ROS 2 Kilted typestore are known) or :meth:`add_like` (copy of an input topic, with
    its stored definition and QoS).
    """

    def __init__(
        self, out: str | os.PathLike, storage: str = "mcap", overwrite: bool = False
    ) -> None:
        if storage not in STORAGES:
            raise BagError(f"storage must be one of {', '.join(STORAGES)}; got {storage!r}")
        self.out = check_output_path(out, overwrite)
        self.storage = storage
        self.overwrite = overwrite
        self._tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self._writer: Writer | None = None
        self._conns: dict[str, Connection] = {}
        self.counts: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> BagWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self._tmp.exists():
            shutil.rmtree(self._tmp)
        self._tmp.mkdir()
        # The data file is named after the bag directory, so write under the final name.
        self._writer = Writer(self._tmp / self.out.name, version=9,
                              storage_plugin=_PLUGINS[self.storage])
        self._writer.open()
        return self

    def __enter__(self) -> BagWriter:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def commit(self) -> Path:
        """Close the bag and move it to ``out`` (replacing an old bag with ``overwrite``)."""
        writer, self._writer = self._writer, None
        if writer is None:
            raise BagError("bag writer is not open")
        try:
            writer.close()
            old = None
            if self.out.exists():
                check_output_path(self.out, self.overwrite)
                old = self._tmp.parent / f".{self.out.name}.old-{os.getpid()}"
                self.out.rename(old)
            (self._tmp / self.out.name).rename(self.out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        """Drop everything written so far; ``out`` is left untouched."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.abort()
            except Exception:  # noqa: BLE001 - the temp dir is removed either way
                pass
        shutil.rmtree(self._tmp, ignore_errors=True)

    # ------------------------------------------------------------------ topics
    @property
    def writer(self) -> Writer:
        if self._writer is None:
            raise BagError("bag writer is not open")
        return self._writer

    def has_topic(self, topic: str) -> bool:
        return topic in self._conns

    def add_topic(
        self,
        topic: str,
        msgtype: str,
        msgdef: str | None = None,
        rihs01: str | None = None,
        qos: Iterable[Any] = (),
    ) -> None:
        """Declare ``topic``; the definition comes from the typestore unless given."""
        if topic in self._conns:
            if self._conns[topic].msgtype != msgtype:
                raise BagError(f"topic {topic} declared twice with different types")
            return
        if not msgdef or not rihs01:
            msgdef, rihs01 = definition(msgtype)
        self._conns[topic] = self.writer.add_connection(
            topic, msgtype, msgdef=msgdef, rihs01=rihs01, offered_qos_profiles=list(qos)
        )
        self.counts[topic] = 0

    def add_like(self, conn: Connection) -> bool:
        """Declare a topic like an input connection (same definition, hash and QoS).

        Returns False when neither the bag nor the typestore has the type's definition (the
        topic cannot be written then).
        """
        msgdef = conn.msgdef.data if conn.msgdef.format != MessageDefinitionFormat.NONE else ""
        digest = conn.digest or ""
        if not msgdef or not digest:
            try:
                msgdef, digest = definition(conn.msgtype)
            except KeyError:
                return False
        qos = conn.ext.offered_qos_profiles if isinstance(conn.ext, ConnectionExtRosbag2) else []
        self.add_topic(conn.topic, conn.msgtype, msgdef, digest, qos)
        return True

    # ------------------------------------------------------------------ messages
    def write(self, topic: str, timestamp: int, raw: bytes | memoryview) -> None:
        """Write raw CDR ``raw`` on a declared ``topic`` at ``timestamp`` (ns)."""
        try:
            conn = self._conns[topic]
        except KeyError:
            raise BagError(f"topic {topic} was not declared") from None
        self.writer.write(conn, int(timestamp), raw)
        self.counts[topic] += 1

    def write_msg(self, topic: str, timestamp: int, msg: Any) -> None:
        """Serialize an rclpy message and write it."""
        self.write(topic, timestamp, serialize(msg))

    @property
    def message_count(self) -> int:
        return sum(self.counts.values())
