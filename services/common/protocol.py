"""Protocol constants every service shares, each defined once here (RFC sections beside them).

Plain strings, no I/O, no imports: ingest, policy and deliver compare with these names, never
with the literal text. The Redis key prefix lives with the other keys (``spool.PREFIX``).
"""

from __future__ import annotations

from typing import Final

# RFC 8689 §4.1: the MAIL FROM parameter and EHLO keyword; kept in Envelope.mail_options.
REQUIRETLS: Final = "REQUIRETLS"

# RFC 5248 registry, X.7.10 "Encryption needed": the enhanced status of a round held back
# because TLS was required and not available (transient; 5.7.10 is its permanent form).
TLS_REQUIRED_STATUS: Final = "4.7.10"
TLS_REQUIRED_STATUSES: Final = (TLS_REQUIRED_STATUS, "5.7.10")
