"""Access tokens in IMAGE_TILES: substituting them, and redacting them from every message, log and file.

IMAGE_TILES may carry an access token. Every URL that reaches a message, a log record, an
exception or a file goes through ``redact``, which masks ``access_token`` and any query
parameter whose name looks secret, and the literal token wherever it appears.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from typing import Iterable, Sequence

from osmseg.errors import SourceError

# Blank imagery, skynet-data's rule: mostly black (no data) or mostly white (clouds, no data).


TOKEN_ENV = "MapboxAccessToken"


# Ways to write "put the token here" in IMAGE_TILES: the seed's Makefile form first.
_TOKEN_PLACEHOLDERS = ("$(MapboxAccessToken)", "${MapboxAccessToken}", "$MapboxAccessToken",
                       "{token}", "{access_token}")


# Query keys whose values are secrets: any name ending in one of these words, case-insensitive
# (access_token, apiKey, subscription-key, X-Amz-Signature, X-Amz-Credential, sig, ...).
# Masking a harmless value is cheap; printing a token is not.
_SECRET_KEY = re.compile(
    r".*(token|key|secret|signature|sig|password|passwd|pwd|credential|auth|authorization|session)s?",
    re.IGNORECASE,
)


_QUERY_PAIR = re.compile(r"(?P<sep>[?&;])(?P<key>[^=&;#\s'\"]+)=(?P<value>[^&;#\s'\"]*)")


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask secrets in a URL, or in any text that contains URLs.

    Masks the values of query parameters whose names look secret (access_token, token, key,
    apikey, api_key, secret, signature, sig, password, ...), user:password@ in URLs, and
    every literal occurrence of the given secrets (a token may also sit in a URL's path).

    Args:
        text: a URL, a message or an exception's text.
        secrets: literal strings to mask wherever they occur.
    """
    text = str(text)
    for secret in secrets:
        # Very short strings would mask half of every message; tokens are long.
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
            quoted = urllib.parse.quote(secret, safe="")
            if quoted != secret:
                text = text.replace(quoted, "***")

    def mask(match: re.Match) -> str:
        key = match.group("key")
        if _SECRET_KEY.fullmatch(urllib.parse.unquote(key)) and match.group("value"):
            return f"{match.group('sep')}{key}=***"
        return match.group(0)

    text = _QUERY_PAIR.sub(mask, text)
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)


class _RedactingFilter(logging.Filter):
    """Redacts URLs in log records (urllib3 logs request lines, queries included, at DEBUG)."""

    secrets: tuple[str, ...] = ()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is logging's problem, not ours
            return True
        record.msg, record.args = redact(message, _RedactingFilter.secrets), None
        return True


_LOG_FILTER = _RedactingFilter()


def guard_logs(secrets: Sequence[str]) -> None:
    _RedactingFilter.secrets = tuple(set(_RedactingFilter.secrets) | {s for s in secrets if s})
    for name in ("urllib3", "urllib3.connectionpool", "requests"):
        logger = logging.getLogger(name)
        if _LOG_FILTER not in logger.filters:
            logger.addFilter(_LOG_FILTER)


def substitute_token(spec: str, token: str | None) -> tuple[str, bool]:
    """Put the token where IMAGE_TILES asks for it ($(MapboxAccessToken), {token}, ...).

    Returns:
        The spec with the token in place, and whether it asked for one.
    """
    wanted = any(placeholder in spec for placeholder in _TOKEN_PLACEHOLDERS)
    if wanted and not token:
        raise SourceError(
            f"IMAGE_TILES asks for an access token ({redact(spec)}) but none is set: "
            f"export {TOKEN_ENV}=... or pass --token"
        )
    for placeholder in _TOKEN_PLACEHOLDERS:
        spec = spec.replace(placeholder, urllib.parse.quote(token or "", safe=""))
    return spec, wanted


def query_secrets(url: str) -> list[str]:
    query = urllib.parse.urlsplit(url).query
    return [value for key, value in urllib.parse.parse_qsl(query) if _SECRET_KEY.fullmatch(key) and value]


def carry_secrets(tilejson_url: str, template: str) -> str:
    """Give a tile template the TileJSON URL's secret query parameters when it lacks them.

    Mapbox's TileJSON repeats the access token in its tile URLs; other servers expect the
    client to add it again.
    """
    parts = urllib.parse.urlsplit(tilejson_url)
    have = {key for key, _ in urllib.parse.parse_qsl(urllib.parse.urlsplit(template).query)}
    extra = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if _SECRET_KEY.fullmatch(k) and k not in have]
    if not extra:
        return template
    joiner = "&" if "?" in template else "?"
    return template + joiner + urllib.parse.urlencode(extra)
