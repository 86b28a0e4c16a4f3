"""Credentials kept out of everything logged, saved or printed.

A URI may carry them (`s3://KEY:SECRET@bucket/x`, `postgresql://user:pw@host/db`,
`...?secret_key=...`); runs use the URI as given, and everything written for people to
read (W&B config, checkpoints' config, results.json, sweep.json, error messages) goes
through `public_uri`, which keeps scheme, host and path.
"""

from __future__ import annotations

import re

REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]*)@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&;][^=&#\s]*(?:key|token|secret|password|passwd|pwd|credential)[^=&#\s]*=)"
                           r"(?P<value>[^&#\s]*)", re.IGNORECASE)


def public_uri(text: str) -> str:
    """`text` (a URI, or a message holding URIs) with user:password and secret query
    values replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}{REDACTED}", text)


def is_redacted(text: str) -> bool:
    """Whether `text` is a URI that `public_uri` took credentials out of."""
    return f"://{REDACTED}@" in text or f"={REDACTED}" in text
