"""meshgate.service.identity: the HS256 identity tokens of service-to-service calls.
Every token is made inside its test (never at collection), and expiry is tested with
claims dated relative to the test's own clock."""

from __future__ import annotations

import time

import jwt
import pytest

from meshgate.errors import MeshgateError
from meshgate.service.errors import IdentityError
from meshgate.service.identity import IdentitySigner, verify_identity

SECRET = "s" * 64  # long enough for HS512 too (RFC 7518 3.2)
OTHER = "o" * 64


def test_a_token_names_its_caller_to_its_callee() -> None:
    token = IdentitySigner("orders", SECRET).token("payments")
    assert verify_identity(token, audience="payments", secret=SECRET) == "orders"


def test_a_signer_reuses_a_token_until_near_expiry() -> None:
    signer = IdentitySigner("orders", SECRET)
    first = signer.token("payments")
    assert signer.token("payments") == first
    assert signer.token("inventory") != first  # one per callee
    claims = jwt.decode(first, SECRET, algorithms=["HS256"], audience="payments")
    assert 0 < claims["exp"] - time.time() <= 60


@pytest.mark.parametrize("secret", ["", "short", "x" * 31])
def test_a_short_secret_is_refused_with_the_fix(secret: str) -> None:
    with pytest.raises(MeshgateError, match="at least 32 characters"):
        IdentitySigner("orders", secret)
    with pytest.raises(MeshgateError, match="at least 32 characters"):
        verify_identity("x.y.z", audience="payments", secret=secret)


def test_a_token_for_another_callee_is_refused() -> None:
    token = IdentitySigner("orders", SECRET).token("inventory")
    with pytest.raises(IdentityError, match="not addressed to 'payments'"):
        verify_identity(token, audience="payments", secret=SECRET)


def test_a_token_signed_with_another_secret_is_refused() -> None:
    token = IdentitySigner("orders", OTHER).token("payments")
    with pytest.raises(IdentityError, match="invalid"):
        verify_identity(token, audience="payments", secret=SECRET)


def test_a_tampered_token_is_refused() -> None:
    token = IdentitySigner("notifications", SECRET).token("payments")
    head, _body, signature = token.split(".")
    forged_body = jwt.utils.base64url_encode(
        b'{"iss":"orders","sub":"orders","aud":"payments","exp":9999999999}'
    ).decode()
    with pytest.raises(IdentityError, match="invalid"):
        verify_identity(f"{head}.{forged_body}.{signature}", audience="payments", secret=SECRET)


def test_an_expired_token_is_refused_past_the_leeway() -> None:
    now = int(time.time())
    claims = {"iss": "orders", "aud": "payments", "iat": now - 120, "exp": now - 30}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    with pytest.raises(IdentityError, match="expired"):
        verify_identity(token, audience="payments", secret=SECRET)
    # Within the five-second leeway, clocks that differ a little still agree.
    claims["exp"] = now - 2
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    assert verify_identity(token, audience="payments", secret=SECRET) == "orders"


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_only_hs256_is_accepted(algorithm: str) -> None:
    now = int(time.time())
    claims = {"iss": "orders", "aud": "payments", "exp": now + 60}
    token = jwt.encode(claims, SECRET, algorithm=algorithm)
    with pytest.raises(IdentityError, match="invalid"):
        verify_identity(token, audience="payments", secret=SECRET)


def test_an_unsigned_token_is_refused() -> None:
    now = int(time.time())
    token = jwt.encode({"iss": "orders", "aud": "payments", "exp": now + 60}, None, "none")
    with pytest.raises(IdentityError, match="invalid"):
        verify_identity(token, audience="payments", secret=SECRET)


@pytest.mark.parametrize("missing", ["iss", "aud", "exp"])
def test_a_token_without_a_required_claim_is_refused(missing: str) -> None:
    now = int(time.time())
    claims = {"iss": "orders", "aud": "payments", "exp": now + 60}
    del claims[missing]
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    with pytest.raises(IdentityError):
        verify_identity(token, audience="payments", secret=SECRET)


def test_a_token_naming_no_caller_is_refused() -> None:
    now = int(time.time())
    claims = {"iss": "", "aud": "payments", "exp": now + 60}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    with pytest.raises(IdentityError):
        verify_identity(token, audience="payments", secret=SECRET)
