"""Signing secrets: the whsec_ strings of [server] signing_secrets or TASKD_SIGNING_SECRETS,
checked without ever being shown."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Any

from taskd.config.model import SigningSecret
from taskd.config.tables import Table, describe

KEY = "signing_secrets"
ENV = "TASKD_SIGNING_SECRETS"
PREFIX = "whsec_"
# Standard Webhooks asks for 24 to 64 random bytes. Fewer could be guessed; more do no harm
# (HMAC hashes a long key down), and a receiver's own secret may be longer.
MIN_BYTES = 24
_RULE = f'strings "{PREFIX}" followed by the base64 of {MIN_BYTES} or more random bytes'
# What separates the secrets in the environment variable: whitespace or commas, which no
# secret contains (base64 has neither).
_SEPARATORS = re.compile(r"[\s,]+")


def read_signing_secrets(t: Table, env_value: str) -> tuple[SigningSecret, ...]:
    """The secrets of [server] `t`, or those of TASKD_SIGNING_SECRETS (`env_value`) when it
    is set, which replace them; both are checked. A problem names the secret by its place
    in the list, never by its text."""
    value = t.data.get(KEY, [])
    if isinstance(value, list):
        secrets = _decoded(t, value, "")
    else:
        # describe() would quote a string given where the array belongs: the secret itself.
        shown = "a string" if isinstance(value, str) else describe(value)
        t.problem(KEY, f"must be an array of {_RULE}, got {shown}")
        secrets = ()
    if env_value.strip():
        secrets = _decoded(t, _SEPARATORS.split(env_value.strip()), f" (from {ENV})")
    return secrets


def _decoded(t: Table, texts: Sequence[Any], origin: str) -> tuple[SigningSecret, ...]:
    places: dict[bytes, int] = {}  # each key read so far, and its place in the list
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            t.problem(KEY, f"must be a string, got {describe(text)}", suffix=f"[{i}]{origin}")
            continue
        key, problem = _key(text)
        if problem is None and key in places:
            problem = f"repeats {KEY}[{places[key]}]"
        if problem is not None:
            t.problem(KEY, problem, suffix=f"[{i}]{origin}")
            continue
        places[key] = i
    if len(places) != len(texts):
        return ()
    return tuple(SigningSecret(key) for key in places)


def _key(text: str) -> tuple[bytes, str | None]:
    """The key a secret stands for, or what is wrong with it (without showing it)."""
    if not text.startswith(PREFIX):
        return b"", f'must start with "{PREFIX}" (a Standard Webhooks secret; value not shown)'
    encoded = text.removeprefix(PREFIX)
    try:
        # Padding may be left out, as the standardwebhooks libraries allow.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        return b"", f'the part after "{PREFIX}" must be base64 (value not shown)'
    if len(key) < MIN_BYTES:
        return b"", f"must encode at least {MIN_BYTES} bytes, got {len(key)} (value not shown)"
    return key, None
