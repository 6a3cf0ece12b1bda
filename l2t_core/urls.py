"""URLs with credentials in them: how they are shown (:func:`redact_url`) and where they are refused
(:func:`refuse_credentials`).

A run's URLs are written to many places: ``train_config.json`` in every checkpoint, the DuckDB
warehouse, Dagster metadata and event logs, log lines and error messages. l2t therefore refuses a
URL that carries credentials (``ftp://user:password@host/...``, ``https://token@host/...``,
``s3://KEY:SECRET@bucket/...``, a presigned ``...?X-Amz-Signature=...``) wherever one enters (the
configs, :class:`~l2t_core.checkpoint.RunStorage`, the command line), with
:class:`CredentialsInURL`; credentials reach the storage backend through the environment or
fsspec ``storage_options`` instead (:data:`HOW_TO_PASS_CREDENTIALS`). Everything that shows a URL
shows it through :func:`redact_url`, which never reveals a credential even in URLs that are
ambiguous or malformed.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

REDACTED = "REDACTED"

# query parameters whose values are credentials: presigned S3 URLs (X-Amz-Credential, -Signature,
# -Security-Token), Azure SAS (sig), OAuth/API tokens and keys, passwords
SECRET_PARAM = re.compile(
    r"secret|token|passw|pwd|signature|credential|^sig$|api[-_]?key|access[-_]?key|^key$|auth",
    re.IGNORECASE)

# "::" that starts another URL of an fsspec chain (simplecache::s3://..., zip://member::https://...)
_CHAIN = re.compile(r"::(?=[A-Za-z][A-Za-z0-9+.-]*://)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Azure URLs name the container before the "@" (abfs://container@account.dfs.core.windows.net/path)
_CONTAINER_AT = {"abfs", "abfss", "az", "wasb", "wasbs"}

HOW_TO_PASS_CREDENTIALS = (
    "give them to the storage backend instead: environment variables (s3://: AWS_ACCESS_KEY_ID, "
    "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN or AWS_PROFILE; gs://: GOOGLE_APPLICATION_CREDENTIALS; "
    "az:// and abfs://: AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY; any fsspec protocol: "
    "FSSPEC_<PROTOCOL>_<OPTION>, e.g. FSSPEC_FTP_USERNAME and FSSPEC_FTP_PASSWORD), or fsspec "
    "storage_options in Python (Trainer(cfg, storage_options={...}), RunStorage(url, storage_options={...}))"
)


class CredentialsInURL(ValueError):
    """A URL with credentials in it where l2t would save or show it (the message holds only the
    redacted URL)."""


def _redact_params(text: str, found: list[str], kind: str = "query parameter") -> str:
    """``a=1&token=x;b=2`` with the values of credential parameters replaced (names matched after
    percent-decoding, so ``X%2DAmz%2DSignature`` and a percent-encoded ``token%3Dx`` count too)."""
    parts = re.split(r"([&;])", text)
    for i in range(0, len(parts), 2):
        param = parts[i]
        name, eq, value = param.partition("=")
        if not eq:  # maybe an encoded "name=value" (token%3Dabc)
            name, eq, value = unquote_plus(param).partition("=")
            if eq and value and value != REDACTED and SECRET_PARAM.search(name.strip()):
                parts[i] = f"{name.strip()}={REDACTED}"
                found.append(f"{kind} {name.strip()!r}")
            continue
        decoded = unquote_plus(name).strip()
        if value and value != REDACTED and SECRET_PARAM.search(decoded):
            parts[i] = f"{name}={REDACTED}"
            found.append(f"{kind} {decoded!r}")
    return "".join(parts)


# a database string of the form "scheme:name?options" (DuckDB's "md:db?motherduck_token=...")
_SCHEME_QUERY = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:(?:[^/?#][^?#]*)?)\?(.*)$", re.S)


def _redact_one(text: str, found: list[str]) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep:
        m = _SCHEME_QUERY.match(text)
        if m:  # no "//" but options after a "?": their credential values go too
            return f"{m.group(1)}?{_redact_params(m.group(2), found)}"
        return text  # a plain path: kept as written
    if scheme.lower() == "file":
        return text  # a local file URL: kept as written
    first_at = rest.find("@")
    if first_at != -1:
        before = rest[:first_at]
        user, colon, _ = before.partition(":")
        authority = rest[: min([i for i in (rest.find(c) for c in "/?#") if i != -1], default=len(rest))]
        if colon and "/" not in user:
            last_at = rest.rindex("@")
            found.append("user:password@" if "/" not in rest[:last_at] else
                         "user:password@, or an '@' in the path after a port (write that one as %40)")
            rest = rest[last_at + 1:]  # user:password@ with any characters in the password
        elif "@" in authority and not (scheme.lower().rsplit("::", 1)[-1] in _CONTAINER_AT
                                       and ":" not in authority[:authority.rindex("@")]):
            found.append("user:password@" if ":" in authority[:authority.rindex("@")] else "user@ or token@")
            rest = rest[authority.rindex("@") + 1:]  # a standard userinfo (a token, user:password)
    head, qmark, query = rest.partition("?")
    fragment = ""
    if qmark:
        query, hash_, fragment = query.partition("#")
        rest = head + "?" + _redact_params(query, found)
        fragment = hash_ + fragment
    else:
        rest, hash_, fragment = rest.partition("#")
        fragment = hash_ + fragment
    if "=" in fragment:  # OAuth puts tokens in the fragment (#access_token=...)
        fragment = "#" + _redact_params(fragment[1:], found, "fragment parameter")
    return f"{scheme}://{rest}{fragment}"


def _redact(url: Any) -> tuple[str, list[str]]:
    found: list[str] = []
    text = _redact_one(str(url), found)
    # the other URLs of an fsspec chain; after the first pass, so that a password holding "::" is
    # already gone with the rest of its user info
    pieces = _CHAIN.split(text)
    if len(pieces) > 1:
        text = "::".join([pieces[0], *(_redact_one(p, found) for p in pieces[1:])])
    return text, found


def redact_url(url: Any) -> str:
    """``url`` safe to log, show or store: without its user/password part, and with the values of
    query (or fragment) parameters that carry credentials (``X-Amz-Signature``, ``token``, ``sig``,
    ``password``, ...) replaced by ``REDACTED``; the rest is kept as written (host case, IPv6
    brackets, escapes). Plain paths and ``file://`` URLs are returned unchanged, and so is the
    container of an Azure URL (``abfs://container@account.dfs.core.windows.net/...``). A database
    string without ``//`` has its options' credentials replaced too (MotherDuck's
    ``md:db?motherduck_token=...``).

    ``user:password@`` is removed even when the password holds characters a URL should have
    escaped, as AWS secret keys do (``/``, ``+``; also ``?``, ``#``, ``@``): after a ``user:``
    prefix, everything up to the last ``@`` goes. A URL that is not ambiguous about it is shown
    whole; one that is (``https://host:9000/a@b``: a port, or a password that starts with digits
    and a ``/``?) is shown shortened (``https://b``) rather than risk showing a credential. Every
    URL of an fsspec chain (``simplecache::s3://...``) is redacted; a chain with user info after a
    ``member::`` prefix is as ambiguous, and shortened the same way."""
    return _redact(url)[0]


def url_credentials(url: Any) -> list[str]:
    """What in ``url`` is (or may be) a credential: ``[]`` when :func:`redact_url` keeps it whole."""
    text, found = _redact(url)
    if text != str(url) and not found:  # cannot happen today; never call a changed URL clean
        found = ["credentials"]
    return list(dict.fromkeys(found))


def credentials_message(url: Any, what: str) -> str:
    """Why ``url`` (``what``: where it was given) is refused, naming the redacted URL only."""
    return (f"{what}: the URL {redact_url(url)!r} has credentials in it ({'; '.join(url_credentials(url))}). "
            "l2t refuses them because run URLs are saved and shown (train_config.json in every checkpoint, the "
            "DuckDB warehouse, Dagster metadata, logs): remove them from the URL and " + HOW_TO_PASS_CREDENTIALS)


def refuse_credentials(url: Any, what: str) -> Any:
    """``url`` unchanged when it carries no credentials, else :class:`CredentialsInURL` (with the
    redacted URL, where it was given, and how to pass credentials instead). Not a string: unchanged."""
    if isinstance(url, str) and url_credentials(url):
        raise CredentialsInURL(credentials_message(url, what))
    return url


def redact_urls_in(value: Any) -> Any:
    """``value`` with every string that is a URL (``scheme://...``) redacted, inside dicts, lists
    and tuples too (a config as JSON, a row); other values unchanged."""
    if isinstance(value, str):
        return redact_url(value) if _SCHEME.match(value.strip()) else value
    if isinstance(value, dict):
        return {k: redact_urls_in(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_urls_in(v) for v in value)
    return value
