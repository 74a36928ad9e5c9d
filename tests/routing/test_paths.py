"""Request path normalization: one canonical form for matching and forwarding."""

from __future__ import annotations

import random
import re

import pytest

from meshgate.errors import MeshgateError
from meshgate.routing import EncodedSlashes, PathError, normalize_path


@pytest.mark.parametrize(
    ("raw", "mode", "expected"),
    [
        # already canonical
        (b"/", "reject", b"/"),
        (b"/a/b/c", "reject", b"/a/b/c"),
        (b"/a", "reject", b"/a"),
        (b"/a/", "reject", b"/a/"),
        (b"/a/b/", "reject", b"/a/b/"),
        (b"", "reject", b"/"),
        # dot segments (RFC 3986 5.2.4), never above the root
        (b"/a/./b", "reject", b"/a/b"),
        (b"/./a", "reject", b"/a"),
        (b"/a/../b", "reject", b"/b"),
        (b"/a/b/../../c", "reject", b"/c"),
        (b"/a/b/..", "reject", b"/a/"),
        (b"/a/b/.", "reject", b"/a/b/"),
        (b"/a/..", "reject", b"/"),
        (b"/..", "reject", b"/"),
        (b"/.", "reject", b"/"),
        (b"/../../a", "reject", b"/a"),
        (b"/a/../../../b/", "reject", b"/b/"),
        (b"/a/.../b", "reject", b"/a/.../b"),
        (b"/a/..b/.c", "reject", b"/a/..b/.c"),
        # runs of slashes
        (b"//a///b", "reject", b"/a/b"),
        (b"/a//", "reject", b"/a/"),
        (b"//", "reject", b"/"),
        (b"///..//a", "reject", b"/a"),
        # encoded dots are dots
        (b"/%2e%2e/admin", "reject", b"/admin"),
        (b"/public/%2E%2E/admin", "reject", b"/admin"),
        (b"/public/%2e%2E/admin", "reject", b"/admin"),
        (b"/a/.%2e/b", "reject", b"/b"),
        (b"/a/%2e/b", "reject", b"/a/b"),
        (b"/a/%2e", "reject", b"/a/"),
        # unreserved characters are decoded
        (b"/%41", "reject", b"/A"),
        (b"/%61%62c", "reject", b"/abc"),
        (b"/%7E", "reject", b"/~"),
        (b"/%7e%2D%5f%30", "reject", b"/~-_0"),
        # everything else stays encoded, hex in upper case
        (b"/a%20b", "reject", b"/a%20b"),
        (b"/a%3fb", "reject", b"/a%3Fb"),
        (b"/a%3Fb", "reject", b"/a%3Fb"),
        (b"/%c3%a9t%C3%a9", "reject", b"/%C3%A9t%C3%A9"),
        (b"/%25", "reject", b"/%25"),
        (b"/%252e%252e/admin", "reject", b"/%252e%252e/admin"),
        (b"/%23%2B%26", "reject", b"/%23%2B%26"),
        # an encoded slash: forwarded encoded with keep, a separator with decode
        (b"/a%2Fb", "keep", b"/a%2Fb"),
        (b"/a%2fb", "keep", b"/a%2Fb"),
        (b"/a%2F..%2Fb", "keep", b"/a%2F..%2Fb"),
        (b"/a%2Fb", "decode", b"/a/b"),
        (b"/a%2fb", "decode", b"/a/b"),
        (b"/a%2F..%2Fb", "decode", b"/b"),
        (b"/a%2F%2Fb", "decode", b"/a/b"),
        (b"/a%2F", "decode", b"/a/"),
        (b"/a%3Fb", "decode", b"/a%3Fb"),
        # path parameters are kept when forwarding; a dot segment with them is one
        (b"/a;v=1/b", "reject", b"/a;v=1/b"),
        (b"/a/..;x/b", "reject", b"/b"),
        (b"/a/.;x/b", "reject", b"/a/b"),
        (b"/a/;x", "reject", b"/a/"),
        (b"/a%3Bb", "reject", b"/a%3Bb"),
        # keep: an encoded backslash stays encoded too
        (b"/a%5cb", "keep", b"/a%5Cb"),
        # bytes that are not escapes pass through
        (b"/caf\xc3\xa9", "reject", b"/caf\xc3\xa9"),
    ],
)
def test_normalize_path(raw: bytes, mode: EncodedSlashes, expected: bytes) -> None:
    assert normalize_path(raw, mode)[0] == expected


@pytest.mark.parametrize(
    ("raw", "mode", "matched"),
    [
        # Tomcat and Spring route on the path without its parameters: so does the router.
        (b"/admin;jsessionid=1/secret", "reject", b"/admin/secret"),
        (b"/admin;x", "reject", b"/admin"),
        (b"/public/..;/admin", "reject", b"/admin"),
        (b"/public;a=b/../admin;c", "reject", b"/admin"),
        # keep matches an encoded slash as the upstreams that decode it see it
        (b"/admin%2Fsecret", "keep", b"/admin/secret"),
        (b"/public%2F..%2Fadmin", "keep", b"/admin"),
        (b"/admin%2Fsecret", "decode", b"/admin/secret"),
        (b"/plain/path", "reject", b"/plain/path"),
    ],
)
def test_paths_are_matched_without_parameters(
    raw: bytes, mode: EncodedSlashes, matched: bytes
) -> None:
    assert normalize_path(raw, mode)[1] == matched


def test_the_two_forms_are_one_object_when_equal() -> None:
    forwarded, matched = normalize_path(b"/a/./b")
    assert forwarded is matched


@pytest.mark.parametrize(
    ("raw", "mode", "message"),
    [
        (b"/admin%2Fsecret", "reject", "encoded slash (%2F)"),
        (b"/admin%2fsecret", "reject", "encoded slash (%2F)"),
        (b"/admin%5Csecret", "reject", "encoded backslash (%5C)"),
        (b"/admin%5csecret", "decode", "encoded backslash (%5C)"),
        (b"/admin\\secret", "reject", "backslash"),
        (b"/admin\\secret", "decode", "backslash"),
        (b"/admin\\secret", "keep", "backslash"),
    ],
)
def test_ambiguous_separators_are_refused(raw: bytes, mode: EncodedSlashes, message: str) -> None:
    with pytest.raises(PathError) as info:
        normalize_path(raw, mode)
    assert message in str(info.value)
    assert "encoded_slashes" in str(info.value)


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
@pytest.mark.parametrize("mode", ["reject", "decode", "keep"])
def test_normalize_path_refuses(raw: bytes, message: str, mode: EncodedSlashes) -> None:
    with pytest.raises(PathError) as info:
        normalize_path(raw, mode)
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
    ";p",
    "..;x",
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


@pytest.mark.parametrize("mode", ["decode", "keep"])
def test_normalizing_twice_changes_nothing(mode: EncodedSlashes) -> None:
    changed = 0
    for raw in _paths(2000, seed=7):
        once, matched = normalize_path(raw, mode)
        assert normalize_path(once, mode)[0] == once, raw
        assert normalize_path(matched, mode)[1] == matched, raw
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
            assert escape != b"2F" or mode == "keep", raw
        assert b"%2F" not in matched, raw
    # The generator produces paths that need normalizing, not just canonical ones.
    assert changed > 1000
