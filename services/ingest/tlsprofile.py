"""Inbound TLS profiles: which protocol versions and cipher suites a listener accepts.

Contract: :func:`apply_profile` sets one of three closed profiles on a server ``SSLContext``
(``ingest.tls_profiles`` names one per listener; defaults ``listen: permissive``,
``submission: intermediate``, ``relay: modern``):

- ``permissive``: TLS 1.0 and later; a broad cipher list incl. CBC (no anonymous, null, RC4,
  export, DES/3DES or MD5 suites), ``@SECLEVEL=0`` so that OpenSSL 3 still speaks TLS 1.0/1.1;
- ``intermediate``: Mozilla's "intermediate": TLS 1.2 with ECDHE/DHE and AES-GCM or
  ChaCha20-Poly1305, and TLS 1.3;
- ``modern``: TLS 1.3 only.

TLS 1.3's own suites are always offered. Why: on port 25 a sender that cannot negotiate TLS falls
back to clear text, so opportunistic security (RFC 7435) keeps the widest set, as Postfix's
``smtpd`` does — a scanner's CBC (LUCKY13) finding is the right trade-off there. Submission serves
authenticated users with modern clients; the inter-region relay has our own software at both ends.

Python deprecates ``ssl.TLSVersion.TLSv1`` (a ``DeprecationWarning``); the one line that sets it
silences that warning only, deliberately. Failure: an unknown name raises ``KeyError`` (config
validation allows only these three).
"""

from __future__ import annotations

import ssl
import warnings
from typing import Final

from services.common.config import TlsProfileName as ProfileName

__all__ = ["ProfileName", "apply_profile"]

_PERMISSIVE_CIPHERS: Final = "HIGH:MEDIUM:!aNULL:!eNULL:!RC4:!EXPORT:!DES:!3DES:!MD5:@SECLEVEL=0"
# https://ssl-config.mozilla.org/ "intermediate" (version 5.7), TLS 1.2 part.
_INTERMEDIATE_CIPHERS: Final = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)


def apply_profile(context: ssl.SSLContext, name: ProfileName) -> ssl.SSLContext:
    """Set the profile's versions and ciphers on ``context`` (returned for chaining)."""
    if name == "permissive":
        context.set_ciphers(_PERMISSIVE_CIPHERS)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "ssl.TLSVersion.TLSv1 ", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1  # RFC 7435: any TLS beats clear text
    elif name == "intermediate":
        context.set_ciphers(_INTERMEDIATE_CIPHERS)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    elif name == "modern":
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    else:
        raise KeyError(name)
    return context
