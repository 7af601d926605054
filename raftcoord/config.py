"""The cluster file: one TOML file that every node of a cluster shares.

:func:`load_config` reads and checks the whole file and returns a frozen
:class:`ClusterConfig`; nothing else in raftcoord parses it. Every mistake
raises :class:`~raftcoord.errors.ConfigError` whose message names the file and
the setting (``cluster.toml: node[1].raft: 'abc' is not host:port``) and
whose ``field`` is the setting, so a typo is caught before any node starts.
Unknown keys are errors for the same reason.

``cluster.example.toml`` at the top of the repository documents every
setting; the tests check that it loads and mentions each one.

Secrets: the cluster secret (peer encryption and authentication) comes from,
in order, the environment variable ``RAFTCOORD_SECRET``, ``cluster.secret``,
or the file named by ``cluster.secret_file``. A node whose raft or client
address is not a loopback address refuses to start without one
(:func:`check_can_start`): pysyncobj's peer messages are pickle, and without
a secret anyone who reaches the raft port can run code on the node. Secrets
and the client token never appear in a ``repr``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from raftcoord.errors import ConfigError, KeyFormatError
from raftcoord.keys import NodeKey

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_MAX_TXN_OPS",
    "MAX_CONFIG_BYTES",
    "MAX_RETENTION_SECONDS",
    "SECRET_ENV",
    "ClusterConfig",
    "NodeConfig",
    "check_can_start",
    "is_loopback",
    "load_config",
    "parse_address",
    "parse_config",
    "stable_id",
]

log = logging.getLogger(__name__)

#: The environment variable that may hold the cluster secret.
SECRET_ENV: Final = "RAFTCOORD_SECRET"
#: The shortest secret accepted: it keys the peers' encryption.
MIN_SECRET_LENGTH: Final = 16
#: The largest cluster file read; a bigger one is a mistake (or /dev/zero).
MAX_CONFIG_BYTES: Final = 1024 * 1024
#: The largest secret file read.
MAX_SECRET_FILE_BYTES: Final = 64 * 1024
#: Ops per txn (compare, success, failure each), as etcd's --max-txn-ops.
DEFAULT_MAX_TXN_OPS: Final = 128
#: Largest request body, as etcd's --max-request-bytes (1.5 MiB).
DEFAULT_MAX_REQUEST_BYTES: Final = 1536 * 1024
#: Largest response a read may build (32 MiB).
DEFAULT_MAX_RESPONSE_BYTES: Final = 32 * 1024 * 1024
#: Ten years: a longer retention would put the purge cut-off before year 1.
MAX_RETENTION_SECONDS: Final = 10 * 365.25 * 86400

# (minimum, maximum) of every number in [cluster]. Each bound keeps a value
# from crashing or wedging a node later: a timeout of 1e300 overflows the
# waits built from it, a heartbeat of 1e-300 leaves no time to commit, a
# retention of 1e11 s puts the purge cut-off before the year 1.
_SECONDS_RANGE: Final = {
    "request_timeout": (0.05, 3600.0),
    "election_timeout_min": (0.05, 600.0),
    "election_timeout_max": (0.05, 1200.0),
    "heartbeat_period": (0.005, 60.0),
    "message_retention_seconds": (0.001, MAX_RETENTION_SECONDS),
    "client_header_timeout": (0.5, 600.0),
    "client_body_timeout": (0.5, 3600.0),
    # below half a second a busy leader marks healthy nodes; a day is plenty
    "node_timeout": (0.5, 86400.0),
}
_INTEGER_RANGE: Final = {
    "message_retention_count": (1, 1_000_000_000),
    "compaction_entries": (2, 1_000_000_000),
    # one batch entry (64 KiB) at least; a TiB of journal would never be replayed in time
    "compaction_bytes": (64 * 1024, 1024**4),
    "max_txn_ops": (1, 10_000),
    # a body must hold a small request; beyond 64 MiB a JSON parse alone is a risk
    "max_request_bytes": (4096, 64 * 1024 * 1024),
    # a response must hold one value of the largest command (1.5 MiB, base64)
    "max_response_bytes": (4 * 1024 * 1024, 1024 * 1024 * 1024),
    "max_client_connections": (8, 1_000_000),
}

_CLUSTER_KEYS: Final = frozenset(
    {
        "name",
        "secret",
        "secret_file",
        "data_dir",
        "token",
        "request_timeout",
        "election_timeout_min",
        "election_timeout_max",
        "heartbeat_period",
        "message_retention_seconds",
        "message_retention_count",
        "compaction_entries",
        "compaction_bytes",
        "fsync",
        "max_txn_ops",
        "max_request_bytes",
        "max_response_bytes",
        "client_header_timeout",
        "client_body_timeout",
        "max_client_connections",
        "node_timeout",
    }
)
_NODE_KEYS: Final = frozenset({"name", "raft", "client", "data_dir", "voter"})
_TOP_KEYS: Final = frozenset({"cluster", "node"})
_HOSTNAME: Final = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


def stable_id(name: str) -> int:
    """A stable, nonzero uint64 for a name: the first 8 bytes of its SHA-256.

    Used as the etcd member ID of a node and the cluster ID of a cluster, so
    every node computes the same IDs from the same file.
    """
    value = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return value or 1


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(text: str) -> tuple[str, int]:
    """Split ``host:port`` (or ``[v6-address]:port``); raises ValueError with the reason."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not host:port text")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"{text!r} is not [address]:port")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not host:port")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, as [::1]:7001")
        if not _HOSTNAME.match(host):
            raise ValueError(f"{text!r}: {host!r} is not a host name or address")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is not in 1-65535")
    return host, port


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """One ``[[node]]`` table: a replica of the cluster.

    ``raft`` and ``client`` are canonical ``host:port`` strings (IPv6 hosts in
    brackets); ``data_dir`` is absolute. Non-voters (``voter = false``) are
    pysyncobj read-only nodes: they receive and apply the log but do not vote.
    """

    #: The node's hostname in its node key: 1-255 bytes of UTF-8, no NUL.
    name: str
    #: Where peers reach this node's Raft engine.
    raft: str
    #: Where clients reach this node's HTTP/JSON endpoint.
    client: str
    #: This node's own directory (journal, snapshots).
    data_dir: Path
    #: True for a voting member, False for a non-voting (read-only) replica.
    voter: bool = True

    @property
    def raft_address(self) -> tuple[str, int]:
        """``raft`` as ``(host, port)``."""
        return parse_address(self.raft)

    @property
    def client_address(self) -> tuple[str, int]:
        """``client`` as ``(host, port)``."""
        return parse_address(self.client)

    @property
    def client_url(self) -> str:
        """The base URL of the client endpoint, e.g. ``http://127.0.0.1:2379``."""
        return f"http://{self.client}"

    @property
    def member_id(self) -> int:
        """The node's etcd member ID (see :func:`stable_id`)."""
        return stable_id(self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    """A whole cluster file, checked. Build it with :func:`load_config`.

    Durations are seconds. The secret and the token are left out of ``repr``.
    """

    #: The cluster's name; carried in node states and the etcd cluster ID.
    name: str
    #: Every ``[[node]]``, in file order.
    nodes: tuple[NodeConfig, ...]
    #: The file the configuration came from (None when built from a mapping).
    path: Path | None = None
    #: The cluster secret for peer encryption and authentication, or None.
    secret: str | None = field(default=None, repr=False)
    #: Where the secret came from: "env", "secret", "secret_file" or None.
    secret_source: str | None = None
    #: Base directory; a node without its own ``data_dir`` uses ``data_dir/<name>``.
    data_dir: Path = Path("data")
    #: Bearer token the client endpoint requires, or None for no token.
    token: str | None = field(default=None, repr=False)
    #: How long a client request may wait for the cluster.
    request_timeout: float = 10.0
    #: Raft election timeout bounds (pysyncobj ``raftMinTimeout``/``raftMaxTimeout``).
    election_timeout_min: float = 0.4
    election_timeout_max: float = 1.4
    #: Leader heartbeat period (pysyncobj ``appendEntriesPeriod``).
    heartbeat_period: float = 0.1
    #: Messages older than this are purged by the leader.
    message_retention_seconds: float = 3600.0
    #: At most this many messages are kept; older ones beyond it are purged.
    message_retention_count: int = 10000
    #: Log entries between snapshots (pysyncobj ``logCompactionMinEntries``).
    compaction_entries: int = 10000
    #: ...or past this many bytes of log entries since the last snapshot (issue 9).
    compaction_bytes: int = 32 * 1024 * 1024
    #: Fsync the journal and snapshots after each write (slower, survives power loss).
    fsync: bool = False
    #: Most ops in each of a txn's compare, success and failure lists (etcd's default).
    max_txn_ops: int = DEFAULT_MAX_TXN_OPS
    #: Largest HTTP request body accepted (413 beyond it).
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    #: Largest response a read may build (400 naming this setting beyond it).
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    #: Seconds a client connection may take to send a request head (also the idle keep-alive time).
    client_header_timeout: float = 10.0
    #: Seconds a client may take to send a request body (408 beyond it).
    client_body_timeout: float = 30.0
    #: Client connections open at once; more are closed as they come.
    max_client_connections: int = 1024
    #: Seconds the leader goes without hearing a node before it marks the
    #: node ``unreachable`` (and a new leader waits before marking anyone).
    node_timeout: float = 5.0

    def node(self, name: str) -> NodeConfig:
        """The node called ``name``; raises ConfigError naming the known nodes."""
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(repr(n.name) for n in self.nodes)
        raise ConfigError(f"{self._where()}node {name!r} is not in the file (nodes: {known})", field="node")

    @property
    def voters(self) -> tuple[NodeConfig, ...]:
        """The voting members."""
        return tuple(n for n in self.nodes if n.voter)

    @property
    def non_voters(self) -> tuple[NodeConfig, ...]:
        """The non-voting (read-only) replicas."""
        return tuple(n for n in self.nodes if not n.voter)

    def peers(self, name: str) -> tuple[NodeConfig, ...]:
        """Every node but ``name`` (which must exist)."""
        self.node(name)
        return tuple(n for n in self.nodes if n.name != name)

    @property
    def cluster_id(self) -> int:
        """The etcd cluster ID (see :func:`stable_id`)."""
        return stable_id(self.name)

    def _where(self) -> str:
        return f"{self.path}: " if self.path is not None else ""


def load_config(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> ClusterConfig:
    """Read and check the cluster file at ``path``.

    ``env`` replaces ``os.environ`` (for ``RAFTCOORD_SECRET``), for tests.
    Raises :class:`ConfigError` naming the file and the setting.
    """
    p = Path(path)
    try:
        raw = read_small_file(p, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the file: {exc.strerror or exc}", field="file") from None
    except ValueError as exc:
        raise ConfigError(f"{p}: {exc}", field="file") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: the file is not UTF-8 text ({exc.reason} at byte {exc.start})", field="file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}", field="file") from None
    except RecursionError:
        raise ConfigError(f"{p}: not valid TOML: arrays or tables nested too deeply", field="file") from None
    return parse_config(data, path=p, env=env)


def read_small_file(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes.

    Raises OSError when it cannot be opened, ValueError (with the reason) when
    it is not a regular file or is too large. The file is opened without
    blocking and checked before reading, so a FIFO, ``/dev/zero`` or
    ``/dev/urandom`` is refused at once instead of hanging or filling memory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, FIFO or socket"
            raise ValueError(f"not a regular file ({kind})")
        if st.st_size > limit:
            raise ValueError(f"the file is larger than {limit} bytes ({st.st_size})")
        chunks: list[bytes] = []
        size = 0
        while True:  # the size may change under us: never read past the limit
            chunk = os.read(fd, min(65536, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ValueError(f"the file is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def parse_config(
    data: Mapping[str, Any], *, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> ClusterConfig:
    """Check an already-parsed cluster mapping (as tomllib gives it).

    Relative paths resolve against the directory of ``path`` (or the current
    directory without one); ``path`` also names the file in error messages.
    """
    return _Parser(Path(path) if path is not None else None, os.environ if env is None else env).parse(data)


def check_can_start(config: ClusterConfig, node_name: str) -> NodeConfig:
    """Refuse to start ``node_name`` where it would be unsafe; returns its NodeConfig.

    A node bound to a non-loopback raft or client address needs the cluster
    secret: without it, peers talk in unauthenticated pickle. A non-loopback
    client endpoint without a token only logs a warning.
    """
    node = config.node(node_name)
    exposed = [
        f"{what} address {addr}"
        for what, addr, (host, _) in (
            ("raft", node.raft, node.raft_address),
            ("client", node.client, node.client_address),
        )
        if not is_loopback(host)
    ]
    if exposed and config.secret is None:
        raise ConfigError(
            f"{config._where()}cluster.secret: node {node_name!r} listens on the non-loopback "
            f"{' and '.join(exposed)} but no cluster secret is set; set cluster.secret, "
            f"cluster.secret_file or the {SECRET_ENV} environment variable",
            field="cluster.secret",
        )
    if not is_loopback(node.client_address[0]) and config.token is None:
        log.warning(
            "node %r serves clients on non-loopback %s without cluster.token: anyone who reaches it can read and write",
            node_name,
            node.client,
        )
    return node


class _Parser:
    """One parse of one file; ``fail`` builds the error with file and setting."""

    def __init__(self, path: Path | None, env: Mapping[str, str]) -> None:
        self.path = path
        self.env = env
        self.base = path.resolve().parent if path is not None else Path.cwd()

    def fail(self, setting: str, problem: str) -> ConfigError:
        where = f"{self.path}: " if self.path is not None else ""
        return ConfigError(f"{where}{setting}: {problem}", field=setting)

    # ------------------------------------------------------------ structure

    def parse(self, data: Mapping[str, Any]) -> ClusterConfig:
        if not isinstance(data, Mapping):
            raise self.fail("file", "the top level must be a table")
        self.check_keys(data, _TOP_KEYS, "")
        cluster = data.get("cluster")
        if cluster is None:
            raise self.fail("cluster", "the [cluster] table is missing")
        if not isinstance(cluster, Mapping):
            raise self.fail("cluster", "must be a table ([cluster])")
        self.check_keys(cluster, _CLUSTER_KEYS, "cluster.")
        raw_nodes = data.get("node")
        if raw_nodes is None:
            raise self.fail("node", "no [[node]] tables: a cluster needs at least one node")
        if not isinstance(raw_nodes, list) or not all(isinstance(n, Mapping) for n in raw_nodes):
            raise self.fail("node", "must be an array of tables ([[node]])")
        if not raw_nodes:
            raise self.fail("node", "no [[node]] tables: a cluster needs at least one node")

        name = self.name(cluster, "cluster.name")
        data_dir = self.path_setting(cluster, "cluster.data_dir", default="data")
        secret, source = self.secret(cluster)
        token = self.optional_text(cluster, "cluster.token")
        timeouts = {
            key: self.seconds(cluster, f"cluster.{key}", default)
            for key, default in (
                ("request_timeout", 10.0),
                ("election_timeout_min", 0.4),
                ("election_timeout_max", 1.4),
                ("heartbeat_period", 0.1),
            )
        }
        if timeouts["election_timeout_max"] <= timeouts["election_timeout_min"]:
            raise self.fail(
                "cluster.election_timeout_max",
                f"{timeouts['election_timeout_max']} must be greater than "
                f"cluster.election_timeout_min ({timeouts['election_timeout_min']})",
            )
        if timeouts["heartbeat_period"] * 3 >= timeouts["election_timeout_min"]:
            raise self.fail(
                "cluster.heartbeat_period",
                f"{timeouts['heartbeat_period']} must be less than a third of "
                f"cluster.election_timeout_min ({timeouts['election_timeout_min']}), or followers "
                "start elections between heartbeats",
            )
        node_timeout = self.seconds(cluster, "cluster.node_timeout", 5.0)
        if node_timeout <= 3 * timeouts["heartbeat_period"]:
            raise self.fail(
                "cluster.node_timeout",
                f"{node_timeout} must be more than three heartbeat periods "
                f"(cluster.heartbeat_period is {timeouts['heartbeat_period']}), or healthy nodes "
                "are marked unreachable between heartbeats",
            )
        retention_seconds = self.seconds(cluster, "cluster.message_retention_seconds", 3600.0)
        retention_count = self.integer(cluster, "cluster.message_retention_count", 10000)
        compaction = self.integer(cluster, "cluster.compaction_entries", 10000)
        compaction_bytes = self.integer(cluster, "cluster.compaction_bytes", 32 * 1024 * 1024)
        fsync = self.boolean(cluster, "cluster.fsync", False)
        limits = {
            key: self.integer(cluster, f"cluster.{key}", default)
            for key, default in (
                ("max_txn_ops", DEFAULT_MAX_TXN_OPS),
                ("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES),
                ("max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES),
                ("max_client_connections", 1024),
            )
        }
        client_timeouts = {
            key: self.seconds(cluster, f"cluster.{key}", default)
            for key, default in (("client_header_timeout", 10.0), ("client_body_timeout", 30.0))
        }

        nodes = tuple(self.node(i, raw, data_dir) for i, raw in enumerate(raw_nodes))
        self.check_unique(nodes)
        if not any(n.voter for n in nodes):
            raise self.fail("node", "no node is a voter: at least one [[node]] needs voter = true")
        return ClusterConfig(
            name=name,
            nodes=nodes,
            path=self.path,
            secret=secret,
            secret_source=source,
            data_dir=data_dir,
            token=token,
            message_retention_seconds=retention_seconds,
            message_retention_count=retention_count,
            compaction_entries=compaction,
            compaction_bytes=compaction_bytes,
            fsync=fsync,
            node_timeout=node_timeout,
            **limits,
            **client_timeouts,
            **timeouts,
        )

    def check_keys(self, table: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                hint = _closest(key, allowed)
                extra = f" (did you mean {prefix}{hint}?)" if hint else ""
                choices = ", ".join(sorted(allowed))
                raise self.fail(f"{prefix}{key}", f"unknown setting{extra}; known settings here: {choices}")

    def node(self, index: int, raw: Mapping[str, Any], base_dir: Path) -> NodeConfig:
        where = f"node[{index}]"
        self.check_keys(raw, _NODE_KEYS, f"{where}.")
        name = self.name(raw, f"{where}.name")
        raft = self.address(raw, f"{where}.raft")
        client = self.address(raw, f"{where}.client")
        if "data_dir" in raw:
            data_dir = self.path_setting(raw, f"{where}.data_dir", default="")
        else:
            if name in (".", "..") or any(c in name for c in "/\\"):
                raise self.fail(
                    f"{where}.data_dir",
                    f"node name {name!r} cannot be a directory name under cluster.data_dir; "
                    "give this node its own data_dir",
                )
            data_dir = base_dir / name
        voter = self.boolean(raw, f"{where}.voter", True)
        return NodeConfig(name=name, raft=raft, client=client, data_dir=data_dir, voter=voter)

    def check_unique(self, nodes: tuple[NodeConfig, ...]) -> None:
        names: dict[str, int] = {}
        addresses: dict[tuple[str, int], str] = {}
        dirs: dict[Path, str] = {}
        for i, node in enumerate(nodes):
            if node.name in names:
                raise self.fail(f"node[{i}].name", f"{node.name!r} is already the name of node[{names[node.name]}]")
            names[node.name] = i
            for what in ("raft", "client"):
                text = getattr(node, what)
                host, port = parse_address(text)
                for key in _listen_keys(host, port):
                    if key in addresses:
                        raise self.fail(f"node[{i}].{what}", f"{text} is already used by {addresses[key]}")
                for key in _listen_keys(host, port):
                    addresses[key] = f"node[{i}].{what}"
            if node.data_dir in dirs:
                owner = dirs[node.data_dir]
                raise self.fail(f"node[{i}].data_dir", f"{node.data_dir} is already the data_dir of {owner}")
            dirs[node.data_dir] = f"node[{i}]"

    # --------------------------------------------------------------- values

    def name(self, table: Mapping[str, Any], setting: str) -> str:
        key = setting.rsplit(".", 1)[1]
        if key not in table:
            raise self.fail(setting, "is required")
        value = table[key]
        if not isinstance(value, str):
            raise self.fail(setting, f"must be a string, not {_toml_type(value)}")
        try:
            NodeKey(value)  # the rules of a hostname in a node key
        except KeyFormatError as exc:
            raise self.fail(setting, exc.message.replace("hostname ", "")) from None
        return value

    def address(self, table: Mapping[str, Any], setting: str) -> str:
        key = setting.rsplit(".", 1)[1]
        if key not in table:
            raise self.fail(setting, "is required (host:port, e.g. 127.0.0.1:7001)")
        value = table[key]
        if not isinstance(value, str):
            raise self.fail(setting, f"must be a \"host:port\" string, not {_toml_type(value)}")
        try:
            host, port = parse_address(value)
        except ValueError as exc:
            raise self.fail(setting, str(exc)) from None
        return _format_address(host, port)

    def optional_text(self, table: Mapping[str, Any], setting: str) -> str | None:
        key = setting.rsplit(".", 1)[1]
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, str):
            raise self.fail(setting, f"must be a string, not {_toml_type(value)}")
        if not value:
            raise self.fail(setting, "must not be empty (leave the setting out instead)")
        if any(c.isspace() for c in value) or not value.isprintable():
            raise self.fail(setting, "must not contain spaces or control characters")
        return value

    def secret(self, cluster: Mapping[str, Any]) -> tuple[str | None, str | None]:
        if "secret" in cluster and "secret_file" in cluster:
            raise self.fail("cluster.secret_file", "set either cluster.secret or cluster.secret_file, not both")
        from_env = self.env.get(SECRET_ENV)
        if from_env is not None and from_env != "":
            return self.check_secret(from_env, SECRET_ENV), "env"
        if "secret" in cluster:
            value = cluster["secret"]
            if not isinstance(value, str):
                raise self.fail("cluster.secret", f"must be a string, not {_toml_type(value)}")
            return self.check_secret(value, "cluster.secret"), "secret"
        if "secret_file" in cluster:
            path = self.path_setting(cluster, "cluster.secret_file", default="")
            try:
                text = read_small_file(path, MAX_SECRET_FILE_BYTES).decode("utf-8").strip()
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise self.fail("cluster.secret_file", f"cannot read {path}: {reason}") from None
            try:
                mode = path.stat().st_mode
            except OSError:
                mode = 0
            if mode & 0o077:
                log.warning("secret file %s can be read by other users (mode %o); chmod 600 it", path, mode & 0o777)
            return self.check_secret(text, "cluster.secret_file"), "secret_file"
        return None, None

    def check_secret(self, value: str, setting: str) -> str:
        if len(value) < MIN_SECRET_LENGTH:
            raise self.fail(
                setting,
                f"the secret is {len(value)} characters; use at least {MIN_SECRET_LENGTH} "
                "(for example: python -c 'import secrets; print(secrets.token_urlsafe(32))')",
            )
        return value

    def path_setting(self, table: Mapping[str, Any], setting: str, default: str) -> Path:
        key = setting.rsplit(".", 1)[1]
        value = table.get(key, default)
        if not isinstance(value, str):
            raise self.fail(setting, f"must be a path string, not {_toml_type(value)}")
        if not value or "\x00" in value:
            raise self.fail(setting, "must be a non-empty path")
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def seconds(self, table: Mapping[str, Any], setting: str, default: float) -> float:
        key = setting.rsplit(".", 1)[1]
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(setting, f"must be a number of seconds, not {_toml_type(value)}")
        low, high = _SECONDS_RANGE[key]
        if not math.isfinite(value) or value <= 0:
            raise self.fail(setting, f"{value} is not a number of seconds more than 0 (at least {low}, at most {high})")
        if not low <= value <= high:
            raise self.fail(setting, f"{value} seconds is out of range: at least {low}, at most {high}")
        return float(value)

    def integer(self, table: Mapping[str, Any], setting: str, default: int) -> int:
        key = setting.rsplit(".", 1)[1]
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(setting, f"must be an integer, not {_toml_type(value)}")
        low, high = _INTEGER_RANGE[key]
        if value < low:
            raise self.fail(setting, f"{value} is less than {low} (at least {low}, at most {high})")
        if value > high:
            raise self.fail(setting, f"{value} is out of range: at least {low}, at most {high}")
        return value

    def boolean(self, table: Mapping[str, Any], setting: str, default: bool) -> bool:
        key = setting.rsplit(".", 1)[1]
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(setting, f"must be true or false, not {_toml_type(value)}")
        return value


_LOOPBACK_NAMES: Final = ("127.0.0.1", "::1")


def _listen_keys(host: str, port: int) -> list[tuple[str, int]]:
    """The (address, port) pairs a listener on ``host:port`` takes, for duplicate checks.

    Loopback names all mean this machine: ``localhost`` takes both
    ``127.0.0.1`` and ``::1``, and an address spelled two ways
    (``::1``, ``0:0:0:0:0:0:0:1``) is one address.
    """
    name = host.lower().rstrip(".")
    if name in ("localhost", "ip6-localhost"):
        return [(a, port) for a in _LOOPBACK_NAMES]
    try:
        return [(ipaddress.ip_address(name).compressed, port)]
    except ValueError:
        return [(name, port)]


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _closest(key: str, allowed: frozenset[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return matches[0] if matches else None
