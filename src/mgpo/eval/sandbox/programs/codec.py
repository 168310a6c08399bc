"""The data codec, shared by the launcher (inside the sandbox) and the judge's harness (outside it).

Values cross the boundary as JSON with tags for what JSON lacks. Encoding (in the sandbox) sends an instance of a
builtin type's subclass as its base type, read through the base type's own methods; decoding (in the harness)
builds only builtin types (int, float, str, bool, None, list, tuple, dict, set, frozenset), so nothing the program
sends can carry its own ``__eq__`` or code. Decoding is bounded (depth, values, CPU time) and linear in the worst
case. Frames are a 4-byte big-endian length followed by that many bytes of JSON.

Standard library only, and valid on the oldest interpreter the sandbox may pick (a system python): this file's
text is sent ahead of the launcher's and the harness's (see ``programs/__init__.py``).
"""

from __future__ import annotations

import collections
import collections.abc
import enum
import json
import os
import time

TYPE_CHECKING = False  # typing costs ~13 ms at each start of a sandboxed process: for checkers only
if TYPE_CHECKING:
    from typing import Any

# Exit statuses of the launcher and the harness, read by the parent (mgpo.eval.sandbox.run)
EXIT_ERROR, EXIT_ASSERT, EXIT_MEMORY, EXIT_GONE, EXIT_EXIT, EXIT_REPLY, EXIT_JUDGE_MEMORY = 92, 93, 94, 95, 96, 97, 98


class ReplyLimit(BaseException):
    """A reply over one of the harness's own bounds. BaseException: the test code's ``except Exception`` cannot
    swallow it and carry on to a pass."""


# Standard-library subclasses whose comparisons with plain values are their base type's.
_STDLIB = (
    collections.Counter,
    collections.OrderedDict,
    collections.defaultdict,
    enum.Enum,
    enum.IntEnum,
    enum.Flag,
    enum.IntFlag,
)
# What a subclass may define and still cross as its base value: construction, pickling, repr, a default.
_SAFE = {
    "__new__",
    "__init__",
    "__repr__",
    "__getnewargs__",
    "__getnewargs_ex__",
    "__reduce__",
    "__reduce_ex__",
    "__init_subclass__",
    "__class_getitem__",
    "__match_args__",
    "__slots__",
    "__module__",
    "__qualname__",
    "__doc__",
    "__dict__",
    "__weakref__",
    "__annotations__",
    "__orig_bases__",
    "__parameters__",
    "__missing__",
    "__firstlineno__",
    "__static_attributes__",
}


# The concrete view types of dict (a view of another mapping class does not cross)
_ITEMS: type[Any] = type({}.items())
_VIEWS: tuple[type[Any], ...] = (type({}.keys()), type({}.values()))


def plain(value: Any, base: type) -> Any:
    """The value read as its builtin base type, when that is what the tests would see in-process. A subclass that
    defines its own ``__eq__``, ``__iter__``, ``__sub__`` ... would decide the tests' comparisons itself there, so
    it does not cross (a false failure at worst, never a false pass)."""
    kind = type(value)
    trusted = [c for c in kind.__mro__ if c in _STDLIB] + [base]
    for cls in kind.__mro__:
        if cls is base:
            break
        if cls in _STDLIB:
            continue
        for name, attr in vars(cls).items():
            if (
                name[:2] == name[-2:] == "__"
                and name not in _SAFE
                and not any(getattr(t, name, None) is attr for t in trusted)
            ):
                raise TypeError(
                    f"a {kind.__name__} defines its own {name}, which would decide what the tests "
                    f"see of it in-process, so it cannot cross the sandbox boundary as a {base.__name__}"
                )
    return value


def encode(value: Any) -> Any:
    """JSON-ready data for ``value``. A Counter, defaultdict, OrderedDict, namedtuple, IntEnum ... crosses as its
    base type, read through the base type's own methods: what the reference harness's in-process == compares."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if isinstance(value, int):  # bool is final: only int subclasses get here
        return int.__int__(plain(value, int))
    if isinstance(value, float):
        return float.__float__(plain(value, float))
    if isinstance(value, str):
        return str.__str__(plain(value, str))
    if isinstance(value, list):
        return [encode(v) for v in list.__iter__(plain(value, list))]
    for base in (tuple, set, frozenset):
        if isinstance(value, base):
            return {base.__name__: [encode(v) for v in base.__iter__(plain(value, base))]}
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(v)] for k, v in dict.items(plain(value, dict))]}
    # What tests may do with a result without comparing it by ==: tuple(result), sorted(result), `in`. These
    # arrive as the harness's own objects of the same kind (a list iterator, a view of a fresh dict, a range).
    if kind is range:
        return {"range": [value.start, value.stop, value.step]}
    if isinstance(value, _ITEMS):
        return {"items": [[encode(k), encode(v)] for k, v in value]}
    for view in _VIEWS:
        if isinstance(value, view):
            return {view.__name__: [encode(v) for v in value]}
    if isinstance(value, collections.abc.Iterator):  # a generator, map, zip, reversed ...: what it yields,
        return {"iterator": [encode(v) for v in list(value)]}  # all of it first, as tuple(result) sees it
    raise TypeError(
        f"a {kind.__name__} cannot cross the sandbox boundary (only plain data: numbers, str, bool, "
        "None, list, tuple, dict, set, frozenset and their subclasses, dict views, range, iterators)"
    )


def spread(keys: list[Any]) -> list[Any]:
    """``keys``, unless their hash values pile up. Building a set or dict from keys whose hashes are all equal
    costs n^2 / 2 comparisons (a set of ints that all hash to 0). Each hash value is counted first, in a dict keyed
    by the hash itself: hash(h) == h for a hash value h, so distinct values never collide there and the count is
    linear."""
    counts: dict[int, int] = {}
    for key in keys:
        h = hash(key)
        counts[h] = counts.get(h, 0) + 1
    probes = sum(c * c for c in counts.values())
    if probes > 8 * len(keys) + 4096:
        raise ReplyLimit(
            f"a set or dict of {len(keys)} keys whose hash values collide ({probes} probes to build "
            "it): refused unbuilt"
        )
    return keys


def _tagged(tag: str, items: list[Any], walk: Any, depth: int) -> Any:
    """The builtin value of one tagged container; a ValueError for an unknown tag or malformed items."""
    if tag == "tuple":
        return tuple(walk(v, depth + 1) for v in items)
    if tag in ("set", "frozenset"):
        keys = spread([walk(v, depth + 1) for v in items])
        return set(keys) if tag == "set" else frozenset(keys)
    if tag in ("dict", "items") and all(type(i) is list and len(i) == 2 for i in items):
        pairs = [(walk(k, depth + 1), walk(v, depth + 1)) for k, v in items]
        spread([k for k, _ in pairs])
        return dict(pairs) if tag == "dict" else dict(pairs).items()
    if tag == "dict_keys":
        return dict.fromkeys(spread([walk(v, depth + 1) for v in items])).keys()
    if tag == "dict_values":
        return dict(enumerate(walk(v, depth + 1) for v in items)).values()
    if tag == "iterator":
        return iter([walk(v, depth + 1) for v in items])
    if tag == "range" and len(items) == 3 and all(type(i) is int for i in items) and items[2]:
        return range(*items)
    raise ValueError(f"malformed value in the sandbox protocol: {json.dumps({tag: items})[:200]!r}")


def decode(data: Any, max_depth: int = 1000, max_items: int = 1 << 62, deadline: float | None = None) -> Any:
    """Builtin values from JSON-ready ``data``, within the bounds; ``deadline``: the time.process_time() by which
    decoding must be done (None: no bound)."""
    count = 0

    def walk(data: Any, depth: int) -> Any:
        nonlocal count
        count += 1
        if count > max_items:
            raise ReplyLimit(f"more than {max_items} values in one reply (SandboxLimits.reply_items)")
        if deadline is not None and not count & 1023 and time.process_time() > deadline:
            raise ReplyLimit("decoding the replies took more CPU time than SandboxLimits.decode_s")
        kind = type(data)
        if data is None or kind in (bool, int, float, str):
            return data
        if depth >= max_depth:
            raise ReplyLimit(f"a reply nested deeper than {max_depth} levels (SandboxLimits.reply_depth)")
        if kind is list:
            return [walk(v, depth + 1) for v in data]
        if kind is dict and len(data) == 1:
            ((tag, items),) = data.items()
            if type(items) is list:
                return _tagged(tag, items, walk, depth)
        raise ValueError(f"malformed value in the sandbox protocol: {json.dumps(data)[:200]!r}")

    return walk(data, 0)


def read_exact(fd: int, n: int, deadline: float | None = None) -> bytes | None:
    """``n`` bytes from ``fd``, or None at end-of-file."""
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
        if deadline is not None and time.process_time() > deadline:  # a reply trickled a byte at a time
            raise ReplyLimit("reading the replies took more CPU time than SandboxLimits.decode_s")
    return b"".join(chunks)


def read_frame(fd: int, limit: int, deadline: float | None = None) -> Any:
    """The next message, or None when the other side closed the channel. A message over the limit is not read."""
    head = read_exact(fd, 4, deadline)
    if head is None:
        return None
    size = int.from_bytes(head, "big")
    if size > limit:
        raise ReplyLimit(f"a message of {size} bytes exceeds the limit of {limit} bytes (SandboxLimits.reply_mb)")
    body = read_exact(fd, size, deadline)
    return None if body is None else json.loads(body)


def write_frame(fd: int, message: Any) -> None:
    body = json.dumps(message).encode()
    data = len(body).to_bytes(4, "big") + body
    while data:
        data = data[os.write(fd, data) :]
