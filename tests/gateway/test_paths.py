"""Request path normalization: one canonical form for matching and forwarding."""

from __future__ import annotations

import random
import re

import pytest

from meshgate.errors import MeshgateError
from meshgate.gateway.paths import PathError, normalize_path


@pytest.mark.parametrize(
    ("raw", "decode_slashes", "expected"),
    [
        # already canonical
        (b"/", False, b"/"),
        (b"/a/b/c", False, b"/a/b/c"),
        (b"/a", False, b"/a"),
        (b"/a/", False, b"/a/"),
        (b"/a/b/", False, b"/a/b/"),
        (b"", False, b"/"),
        # dot segments (RFC 3986 5.2.4), never above the root
        (b"/a/./b", False, b"/a/b"),
        (b"/./a", False, b"/a"),
        (b"/a/../b", False, b"/b"),
        (b"/a/b/../../c", False, b"/c"),
        (b"/a/b/..", False, b"/a/"),
        (b"/a/b/.", False, b"/a/b/"),
        (b"/a/..", False, b"/"),
        (b"/..", False, b"/"),
        (b"/.", False, b"/"),
        (b"/../../a", False, b"/a"),
        (b"/a/../../../b/", False, b"/b/"),
        (b"/a/.../b", False, b"/a/.../b"),
        (b"/a/..b/.c", False, b"/a/..b/.c"),
        # runs of slashes
        (b"//a///b", False, b"/a/b"),
        (b"/a//", False, b"/a/"),
        (b"//", False, b"/"),
        (b"///..//a", False, b"/a"),
        # encoded dots are dots
        (b"/%2e%2e/admin", False, b"/admin"),
        (b"/public/%2E%2E/admin", False, b"/admin"),
        (b"/public/%2e%2E/admin", False, b"/admin"),
        (b"/a/.%2e/b", False, b"/b"),
        (b"/a/%2e/b", False, b"/a/b"),
        (b"/a/%2e", False, b"/a/"),
        # unreserved characters are decoded
        (b"/%41", False, b"/A"),
        (b"/%61%62c", False, b"/abc"),
        (b"/%7E", False, b"/~"),
        (b"/%7e%2D%5f%30", False, b"/~-_0"),
        # everything else stays encoded, hex in upper case
        (b"/a%20b", False, b"/a%20b"),
        (b"/a%3fb", False, b"/a%3Fb"),
        (b"/a%3Fb", False, b"/a%3Fb"),
        (b"/%c3%a9t%C3%a9", False, b"/%C3%A9t%C3%A9"),
        (b"/%25", False, b"/%25"),
        (b"/%252e%252e/admin", False, b"/%252e%252e/admin"),
        (b"/%23%2B%26", False, b"/%23%2B%26"),
        # an encoded slash is data unless the configuration says otherwise
        (b"/a%2Fb", False, b"/a%2Fb"),
        (b"/a%2fb", False, b"/a%2Fb"),
        (b"/a%2F..%2Fb", False, b"/a%2F..%2Fb"),
        (b"/a%2Fb", True, b"/a/b"),
        (b"/a%2fb", True, b"/a/b"),
        (b"/a%2F..%2Fb", True, b"/b"),
        (b"/a%2F%2Fb", True, b"/a/b"),
        (b"/a%2F", True, b"/a/"),
        (b"/a%3Fb", True, b"/a%3Fb"),
        # bytes that are not escapes pass through
        (b"/caf\xc3\xa9", False, b"/caf\xc3\xa9"),
    ],
)
def test_normalize_path(raw: bytes, decode_slashes: bool, expected: bytes) -> None:
    assert normalize_path(raw, decode_slashes=decode_slashes) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"/%", "not followed by two hex digits"),
        (b"/a%", "not followed by two hex digits"),
        (b"/%4", "not followed by two hex digits"),
        (b"/a/%4/b", "not followed by two hex digits"),
        (b"/%zz", "not followed by two hex digits"),
        (b"/%4g", "not followed by two hex digits"),
        (b"/%g4", "not followed by two hex digits"),
        (b"/%%41", "not followed by two hex digits"),
        (b"/% 4", "not followed by two hex digits"),
        (b"/%00", "encoded NUL byte (%00)"),
        (b"/a%00b", "encoded NUL byte (%00)"),
    ],
)
@pytest.mark.parametrize("decode_slashes", [False, True])
def test_normalize_path_refuses(raw: bytes, message: str, decode_slashes: bool) -> None:
    with pytest.raises(PathError) as info:
        normalize_path(raw, decode_slashes=decode_slashes)
    assert message in str(info.value)
    assert isinstance(info.value, MeshgateError)


_PIECES = [
    "a",
    "b",
    "api",
    ".",
    "..",
    "",
    "...",
    "%2e",
    "%2E%2e",
    ".%2E",
    "%41",
    "%7e",
    "%2f",
    "%2F..%2F",
    "%20",
    "%3f",
    "%25",
    "%252e",
    "%c3%a9",
    "x~y",
]
_ESCAPE = re.compile(rb"%(..)")


def _paths(count: int, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        segments = ["".join(rnd.choices(_PIECES, k=rnd.randint(1, 2))) for _ in range(8)]
        path = "/" + "/".join(segments[: rnd.randint(0, 8)])
        if rnd.random() < 0.2:
            path += "/"
        out.append(path.encode())
    return out


@pytest.mark.parametrize("decode_slashes", [False, True])
def test_normalizing_twice_changes_nothing(decode_slashes: bool) -> None:
    changed = 0
    for raw in _paths(2000, seed=7):
        once = normalize_path(raw, decode_slashes=decode_slashes)
        assert normalize_path(once, decode_slashes=decode_slashes) == once, raw
        changed += once != raw

        # The canonical form, spelled out.
        assert once.startswith(b"/"), raw
        assert b"//" not in once, raw
        segments = once.split(b"/")[1:]
        assert b"." not in segments, raw
        assert b".." not in segments, raw
        for escape in _ESCAPE.findall(once):
            assert escape == escape.upper(), raw
            assert escape not in (b"2E", b"41", b"7E"), raw
            assert escape != b"2F" or not decode_slashes, raw
    # The generator produces paths that need normalizing, not just canonical ones.
    assert changed > 1000
