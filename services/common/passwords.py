"""Submission passwords: scrypt hashes (``tlsrelay passwd`` prints one), constant-time checks.

Format: ``scrypt$N$r$p$SALT$HASH`` with SALT and HASH in unpadded base64. ``verify`` never raises
for a wrong password or a malformed hash (it answers False, after the same amount of work as a
real check, so timing does not reveal which users exist); ``check_format`` raises ``ValueError``
naming the problem, for configuration validation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1  # OWASP's scrypt minimum (N=2^14 with r=8 uses 16 MiB per check)
SALT_BYTES, HASH_BYTES = 16, 32
_DUMMY = f"{SCHEME}${N}${R}${P}${'A' * 22}${'A' * 43}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=N, r=R, p=P, dklen=HASH_BYTES)
    return f"{SCHEME}${N}${R}${P}${_b64(salt)}${_b64(digest)}"


def check_format(stored: str) -> None:
    """Raise ``ValueError`` when ``stored`` is not a hash this module can verify."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError("expected a hash from 'tlsrelay passwd' (scrypt$N$r$p$salt$hash)")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        raise ValueError("malformed scrypt hash (bad numbers or base64)") from None
    if n < 2**10 or n & (n - 1) or not (0 < r <= 64 and 0 < p <= 16) or not salt or not digest:
        raise ValueError("scrypt parameters out of range")


def verify(password: str, stored: str | None) -> bool:
    """Constant-time check; a missing user or malformed hash costs the same and answers False."""
    try:
        check_format(stored or "")
        ok = True
    except ValueError:
        stored, ok = _DUMMY, False
    assert stored is not None
    _, n, r, p, salt, digest = stored.split("$")
    expected = _unb64(digest)
    actual = hashlib.scrypt(
        password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
        dklen=len(expected), maxmem=256 * 1024 * 1024,
    )  # fmt: skip
    return hmac.compare_digest(actual, expected) and ok
