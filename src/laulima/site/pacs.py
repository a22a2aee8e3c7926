"""A hospital PACS as a dataset source: query it over DICOMweb, cache what matches, on this machine.

A site registers ``dicomweb+https://pacs.example/dicom-web?Modality=MR&StudyDescription=BRAIN*``
as a dataset source. :func:`retrieve` asks the PACS (QIDO-RS) for the matching studies and
their series, downloads every instance of each series (WADO-RS) into a cache in the site
home, and returns a folder that holds exactly those studies, for the DICOM folder ingest.

Why it is built this way:

* **No plaintext PHI off the machine.** Images carry patient data, so ``http`` is refused
  unless the server is on loopback (a local proxy or a PACS on this host) or the caller
  explicitly allows it; ``https`` always verifies the server certificate (system CAs, or a
  hospital CA file). Credentials in the URL are refused: the URL is stored in the catalog.
* **Nothing half-written.** Each series is downloaded into a temporary folder beside the
  cache and renamed into place only when every instance is on disk, so an interrupted run
  (network failure, Ctrl-C, a killed process) leaves complete series or nothing; leftovers
  of a killed run are swept by the next one. A series already cached with the instance
  count the PACS reports is not downloaded again.
* **Bounded.** A query can match a whole archive; the number of studies and instances is
  capped (settable) and exceeding the cap is an error before anything is downloaded, not a
  disk filled overnight. Every UID and count the server sends is validated before it
  becomes a path or a loop bound.
* **Exact views.** The cache (``<cache>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``) is shared by
  every query, so two sources never download the same series twice; the folder handed to
  the ingest (``Retrieval.root``) is a per-source view of hard links holding only what this
  query matched, rebuilt atomically on each retrieval.

Files and folders are owner-only (0600/0700) like the rest of the site home.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from laulima.errors import ConfigurationError, DataError, LaulimaError, TransportError
from laulima.private_files import PRIVATE_DIR, open_private, private_dir

if TYPE_CHECKING:
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    from laulima.site.catalog import Catalog

__all__ = [
    "DEFAULT_MAX_INSTANCES",
    "DEFAULT_MAX_STUDIES",
    "PACS_CACHE_DIR",
    "QUERY_KEYS",
    "DicomWebSource",
    "Retrieval",
    "parse_dicomweb_source",
    "register_pacs_dataset",
    "retrieve",
    "stow",
]

DEFAULT_MAX_STUDIES = 1000
DEFAULT_MAX_INSTANCES = 10_000
MAX_URL_CHARS = 2048
# A PACS answers a study search with at most this many results per request; we page.
_PAGE = 500
# Seconds to connect, then to wait between bytes: a dead PACS fails fast, a slow one still works.
_TIMEOUT_S = (10.0, 120.0)
_STOW_BATCH = 50  # instances per STOW-RS request, so one request stays a few MB
_PARTIAL_PREFIX = ".partial-"
_VIEWS = "views"  # <cache>/views/<source key>/ : the per-source folders handed to the ingest

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # DICOM UI: digits and dots, at most 64 characters
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}

_STUDY, _SERIES = "study", "series"


@dataclass(frozen=True)
class _Key:
    level: str  # the QIDO-RS level the filter is sent at
    max_chars: int  # the attribute's value length in the DICOM standard (its VR)
    kind: str  # "text" (wildcards * and ? allowed), "code" (CS), "uid" (list of UIDs), "date" (range)


# The query keys a source URL may carry; anything else is refused by name. Modality is a
# series attribute: it filters series, and narrows studies through ModalitiesInStudy.
QUERY_KEYS: dict[str, _Key] = {
    "StudyInstanceUID": _Key(_STUDY, 64 * 100, "uid"),
    "StudyDate": _Key(_STUDY, 17, "date"),
    "StudyDescription": _Key(_STUDY, 64, "text"),
    "AccessionNumber": _Key(_STUDY, 16, "text"),
    "StudyID": _Key(_STUDY, 16, "text"),
    "PatientID": _Key(_STUDY, 64, "text"),
    "SeriesInstanceUID": _Key(_SERIES, 64 * 100, "uid"),
    "SeriesDescription": _Key(_SERIES, 64, "text"),
    "Modality": _Key(_SERIES, 16, "code"),
    "BodyPartExamined": _Key(_SERIES, 16, "code"),
}


@dataclass(frozen=True)
class DicomWebSource:
    """A parsed ``dicomweb+http(s)://`` source: the DICOMweb root and the QIDO-RS filters."""

    url: str  # as given (without credentials, which are refused)
    base_url: str  # http(s)://host:port/path, the DICOMweb root
    host: str
    port: int
    filters: Mapping[str, str]  # query key -> value, keys from QUERY_KEYS

    @property
    def key(self) -> str:
        """A short stable name for this source and query: its view folder under the cache."""
        canonical = self.base_url + "?" + "&".join(f"{k}={v}" for k, v in sorted(self.filters.items()))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def level_filters(self, level: str) -> dict[str, str]:
        return {k: v for k, v in self.filters.items() if QUERY_KEYS[k].level == level}


@dataclass(frozen=True)
class Retrieval:
    """What :func:`retrieve` did. Counts of series: ``fetched`` downloaded now, ``cached`` reused."""

    root: Path  # holds exactly the retrieved studies: <root>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm
    studies: int
    series: int
    instances: int
    fetched: int
    cached: int


# --------------------------------------------------------------------------- parsing


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_value(key: str, value: str, url: str) -> str:
    spec = QUERY_KEYS[key]
    where = f"dataset source {url!r}, query key {key}"
    if not value:
        raise ConfigurationError(f"{where}: empty value; give a value or leave the key out", field=key)
    if len(value) > spec.max_chars:
        raise ConfigurationError(
            f"{where}: value is {len(value)} characters, more than the {spec.max_chars} DICOM allows", field=key
        )
    if any(not ch.isprintable() for ch in value) or ("\\" in value and spec.kind != "uid"):
        raise ConfigurationError(f"{where}: control characters or backslashes are not allowed", field=key)
    if spec.kind == "uid":
        uids = re.split(r"[,\\]", value)
        bad = [u for u in uids if not _UID.match(u) or len(u) > 64]
        if bad or len(uids) > 100:
            raise ConfigurationError(
                f"{where}: {bad[0] if bad else value!r} is not a list of at most 100 UIDs "
                "(digits and dots, at most 64 characters each, separated by commas); UIDs take no wildcards",
                field=key,
            )
        return ",".join(uids)
    if spec.kind == "date":
        if not re.fullmatch(r"(\d{8})?(-(\d{8})?)?", value) or value == "-":
            raise ConfigurationError(
                f"{where}: {value!r} is not a date YYYYMMDD or a range YYYYMMDD-YYYYMMDD (either end may be open)",
                field=key,
            )
        return value
    if spec.kind == "code" and not re.fullmatch(r"[A-Z0-9_ *?]+", value):
        raise ConfigurationError(
            f"{where}: {value!r} is not a DICOM code string (upper-case letters, digits, _ and space, "
            "with * or ? wildcards), e.g. Modality=MR",
            field=key,
        )
    return value


def parse_dicomweb_source(url: str, *, allow_plaintext: bool = False) -> DicomWebSource:
    """Parse and validate ``dicomweb+http(s)://HOST[:PORT]/PATH?Key=value&...``.

    ``http`` is accepted only to a loopback host unless ``allow_plaintext`` is set: images
    are patient data and must not cross a network unencrypted by default.
    Raises :class:`ConfigurationError` naming the part of the URL that is wrong.
    """
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise ConfigurationError(f"dataset source: not a URL of at most {MAX_URL_CHARS} characters")
    scheme, _, rest = url.partition("://")
    if scheme not in ("dicomweb+http", "dicomweb+https"):
        raise ConfigurationError(
            f"dataset source {url!r}: scheme {scheme!r} is not dicomweb+https or dicomweb+http; "
            "write e.g. dicomweb+https://pacs.example.org/dicom-web?Modality=MR",
            field="scheme",
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"dataset source {url!r}: malformed host or port ({exc})", field="port") from exc
    host = parts.hostname or ""
    if not host:
        raise ConfigurationError(f"dataset source {url!r}: no host; write dicomweb+https://HOST/PATH", field="host")
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(
            f"dataset source for host {host}: credentials in the URL are refused, since the source URL is stored "
            "in the dataset catalog; remove the user:password@ part",
            field="host",
        )
    if parts.fragment:
        raise ConfigurationError(f"dataset source {url!r}: remove the #fragment", field="fragment")
    http_scheme = scheme.removeprefix("dicomweb+")
    if http_scheme == "http" and not _is_loopback(host) and not allow_plaintext:
        raise ConfigurationError(
            f"dataset source {url!r}: plaintext http to {host}, which is not this machine, would send patient "
            "images unencrypted; use dicomweb+https://, or allow plaintext http explicitly "
            "(allow_plaintext=True) only if the network to the PACS is trusted",
            field="scheme",
        )
    default_port = 443 if http_scheme == "https" else 80
    port = port if port is not None else default_port
    if not 1 <= port <= 65535:
        raise ConfigurationError(f"dataset source {url!r}: port {port} is not in 1..65535", field="port")
    path = parts.path.rstrip("/")
    netloc = f"[{host}]" if ":" in host else host
    base_url = f"{http_scheme}://{netloc}:{port}{path}"

    filters: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ConfigurationError(
            f"dataset source {url!r}: query string is not Key=value&Key=value ({exc})", field="query"
        ) from exc
    unknown = sorted({k for k, _ in pairs if k not in QUERY_KEYS})
    if unknown:
        raise ConfigurationError(
            f"dataset source {url!r}: unknown query key(s) {', '.join(unknown)}; "
            f"the keys are {', '.join(QUERY_KEYS)} (QIDO-RS attributes, case-sensitive)",
            field="query",
        )
    for key, value in pairs:
        if key in filters:
            raise ConfigurationError(
                f"dataset source {url!r}: query key {key} given twice; give it once (UIDs: a comma-separated list)",
                field=key,
            )
        filters[key] = _check_value(key, value, url)
    return DicomWebSource(url=url, base_url=base_url, host=host, port=port, filters=filters)


# --------------------------------------------------------------------------- the client


def _session() -> requests.Session:
    """A requests session that sends QIDO wildcards ``*`` and ``?`` as they are.

    dicomweb-client percent-encodes every reserved character of a query value, but some
    servers (Orthanc 1.10, the Debian bookworm version) do not decode query values, so
    ``T1%2A`` matches nothing there. Both characters are legal unencoded in a URL query
    (RFC 3986), so sending them raw works with every server.
    """
    import requests

    class _Session(requests.Session):
        def request(self, method: str, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
            if isinstance(url, str) and "?" in url:
                path, _, query = url.partition("?")
                url = path + "?" + query.replace("%2A", "*").replace("%3F", "?")
            return super().request(method, url, *args, **kwargs)

    return _Session()


def _client(source: DicomWebSource, ca_file: Path | None) -> DICOMwebClient:
    from dicomweb_client.api import DICOMwebClient

    session = _session()
    session.trust_env = False  # no proxy from the environment sees patient data unasked
    if ca_file is not None:
        if not source.base_url.startswith("https:"):
            raise ConfigurationError(
                f"ca_file {ca_file} given for plaintext source {source.base_url}: a CA file only applies to https",
                field="ca_file",
            )
        if not Path(ca_file).is_file():
            raise ConfigurationError(
                f"ca_file {ca_file}: no such file; give the PEM file of the CA that signed the PACS certificate",
                field="ca_file",
            )
        session.verify = str(ca_file)
    else:
        session.verify = True
    try:
        client = DICOMwebClient(url=source.base_url, session=session, timeout=_TIMEOUT_S)
    except ValueError as exc:
        raise ConfigurationError(f"dataset source {source.url!r}: {exc}", field="host") from exc
    client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=200)
    return client


@contextmanager
def _translated(source: DicomWebSource, doing: str) -> Iterator[None]:
    """Turn requests' and dicomweb-client's exceptions into Laulima errors naming the server."""
    import requests

    where = f"PACS {source.host}:{source.port} ({source.base_url})"
    try:
        yield
    except LaulimaError:
        raise
    except requests.exceptions.SSLError as exc:
        raise ConfigurationError(
            f"{where}: TLS certificate not accepted while {doing} ({exc}); give the hospital CA file (ca_file)",
            host=source.host,
        ) from exc
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise TransportError(
            f"{where}: cannot reach the server while {doing} ({type(exc).__name__}); "
            "check that the PACS runs and the host and port are right, then retry",
            host=source.host,
        ) from exc
    except requests.exceptions.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise ConfigurationError(
                f"{where}: HTTP {status} while {doing}; this site is not allowed to read the PACS", host=source.host
            ) from exc
        if status in (400, 404, 405):
            raise ConfigurationError(
                f"{where}: HTTP {status} while {doing}; is the URL path the DICOMweb root (e.g. /dicom-web)?",
                host=source.host,
            ) from exc
        raise TransportError(f"{where}: HTTP {status} while {doing}; retry later", host=source.host) from exc
    except requests.exceptions.RequestException as exc:
        raise TransportError(f"{where}: request failed while {doing} ({exc})", host=source.host) from exc
    except (ValueError, KeyError, TypeError, EOFError) as exc:  # undecodable JSON or multipart
        raise DataError(f"{where}: unreadable answer while {doing} ({exc})", host=source.host) from exc


def _value(item: Mapping[str, Any], tag: str) -> Any:
    element = item.get(tag)
    if not isinstance(element, Mapping):
        return None
    values = element.get("Value")
    return values[0] if isinstance(values, list) and values else None


def _uid(item: Mapping[str, Any], tag: str, source: DicomWebSource, what: str) -> str:
    value = _value(item, tag)
    if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
        raise DataError(
            f"PACS {source.host}: a {what} result has no valid UID ({tag} = {str(value)[:80]!r}); "
            "the server's QIDO-RS answer is malformed",
            host=source.host,
        )
    return value


def _search(
    source: DicomWebSource, what: str, page: Callable[[int, int], list[dict[str, Any]]], uid_tag: str, bound: int
) -> list[dict[str, Any]]:
    """Page through a QIDO-RS search; refuse more than ``bound`` distinct results."""
    seen: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        with _translated(source, f"searching {what}"):
            results = page(min(_PAGE, bound + 1 - len(seen)), offset)
        if not isinstance(results, list):
            raise DataError(f"PACS {source.host}: the {what} search did not answer a list", host=source.host)
        new = 0
        for item in results:
            if not isinstance(item, dict):
                raise DataError(f"PACS {source.host}: a {what} result is not an object", host=source.host)
            uid = _uid(item, uid_tag, source, what)
            if uid not in seen:
                seen[uid] = item
                new += 1
        if len(seen) > bound:
            raise ConfigurationError(
                f"dataset source {source.url!r} matches more than {bound} {what}; "
                "narrow the query (e.g. StudyDate, StudyDescription) or raise the limit",
                field="query",
            )
        if not results or not new:  # done, or a server that ignores offset repeats itself
            return list(seen.values())
        offset += len(results)


def _series_pages(
    client: DICOMwebClient, study: str, filters: dict[str, str]
) -> Callable[[int, int], list[dict[str, Any]]]:
    def page(limit: int, offset: int) -> list[dict[str, Any]]:
        return client.search_for_series(
            study, search_filters=filters, fields=["NumberOfSeriesRelatedInstances"], limit=limit, offset=offset
        )

    return page


# --------------------------------------------------------------------------- the cache


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One retrieval per cache at a time: a second one would sweep the first one's partial folders."""
    fd = os.open(cache_dir / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ConfigurationError(
                f"{cache_dir}: another retrieval is filling this PACS cache; wait for it to finish", file=str(cache_dir)
            ) from exc
        yield
    finally:
        os.close(fd)


def _sweep_partials(cache_dir: Path) -> None:
    for leftover in cache_dir.glob(_PARTIAL_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed after."""
    final.parent.mkdir(mode=PRIVATE_DIR, exist_ok=True)  # the study folder, in the cache folder
    old: Path | None = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX + "old-", dir=tmp.parent))
        os.replace(final, old / "x")
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_instance(ds: pydicom.Dataset, path: Path) -> None:
    import pydicom

    fd = open_private(path)
    with os.fdopen(fd, "wb") as fh:
        pydicom.dcmwrite(fh, ds, enforce_file_format=True)


def _fetch_series(
    client: DICOMwebClient,
    source: DicomWebSource,
    study: str,
    series: str,
    expected: int | None,
    tmp: Path,
    budget: int,
    progress: Callable[[int], None],
) -> int:
    """Download every instance of one series into ``tmp``; the number written."""
    written: set[str] = set()
    with _translated(source, f"retrieving series {series}"):
        for ds in client.iter_series(study, series):
            sop = str(getattr(ds, "SOPInstanceUID", ""))
            if len(sop) > 64 or not _UID.match(sop):
                raise DataError(f"PACS {source.host}: an instance of series {series} has no valid SOPInstanceUID")
            if str(getattr(ds, "SeriesInstanceUID", "")) != series or str(getattr(ds, "StudyInstanceUID", "")) != study:
                raise DataError(
                    f"PACS {source.host}: instance {sop} sent for series {series} belongs to another series or study"
                )
            if sop in written:
                continue
            if len(written) >= budget:
                raise ConfigurationError(
                    f"dataset source {source.url!r}: series {series} holds more instances than the remaining "
                    f"limit of {budget}; narrow the query or raise max_instances",
                    field="query",
                )
            _write_instance(ds, tmp / f"{sop}.dcm")
            written.add(sop)
            progress(1)
    if expected is not None and len(written) < expected:
        raise DataError(
            f"PACS {source.host}: series {series} sent {len(written)} of the {expected} instances it lists; "
            "the PACS may still be receiving it, retry later",
            host=source.host,
        )
    if not written:
        raise DataError(f"PACS {source.host}: series {series} sent no instances", host=source.host)
    return len(written)


def _link_view(cache_dir: Path, view: Path, chosen: list[tuple[str, str]]) -> None:
    """Build the per-source folder of hard links (copies where links are impossible) and swap it in."""
    views = private_dir(cache_dir / _VIEWS)
    tmp = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX + "view-", dir=cache_dir))
    try:
        for study, series in chosen:
            (tmp / study).mkdir(mode=PRIVATE_DIR, exist_ok=True)
            target = tmp / study / series
            target.mkdir(mode=PRIVATE_DIR)
            for file in (cache_dir / study / series).iterdir():
                try:
                    os.link(file, target / file.name)
                except OSError:
                    shutil.copy2(file, target / file.name)
        _replace_dir(tmp, views / view.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- public API


def retrieve(
    source: DicomWebSource,
    cache_dir: Path,
    *,
    ca_file: Path | None = None,
    max_studies: int = DEFAULT_MAX_STUDIES,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    progress: Callable[[int, int], None] | None = None,
) -> Retrieval:
    """Query the PACS, download the matching series into ``cache_dir``, return the per-source folder.

    ``progress(done, total)`` is called after each instance is written (a progress bar;
    raising from it interrupts the retrieval cleanly). Errors: :class:`ConfigurationError`
    (bad source, too many matches, access refused), :class:`TransportError` (server
    unreachable or failing: retry), :class:`DataError` (malformed answers).
    """
    for name, bound in (("max_studies", max_studies), ("max_instances", max_instances)):
        if not isinstance(bound, int) or not 1 <= bound <= 10_000_000:
            raise ConfigurationError(f"{name} = {bound!r}: give a whole number in 1..10000000", field=name)
    client = _client(source, ca_file)
    study_filters = source.level_filters(_STUDY)
    if "Modality" in source.filters and not any(c in source.filters["Modality"] for c in "*?"):
        study_filters["ModalitiesInStudy"] = source.filters["Modality"]
    series_filters = source.level_filters(_SERIES)

    studies = _search(
        source, "studies",
        lambda limit, offset: client.search_for_studies(search_filters=study_filters, limit=limit, offset=offset),
        "0020000D", max_studies,
    )  # fmt: skip
    plan: list[tuple[str, str, int | None]] = []
    listed = 0
    for item in studies:
        study = _uid(item, "0020000D", source, "study")
        found = _search(source, f"series of study {study}", _series_pages(client, study, series_filters),
                        "0020000E", max_instances)  # fmt: skip
        for series_item in found:
            series = _uid(series_item, "0020000E", source, "series")
            count = _value(series_item, "00201209")
            expected = count if isinstance(count, int) and 0 <= count <= max_instances else None
            if count is not None and expected is None:
                raise DataError(
                    f"PACS {source.host}: series {series} reports {str(count)[:40]!r} instances, "
                    f"not a count in 0..{max_instances}",
                    host=source.host,
                )
            listed += expected or 0
            if listed > max_instances:
                raise ConfigurationError(
                    f"dataset source {source.url!r} matches more than {max_instances} instances (max_instances); "
                    "narrow the query or raise the limit",
                    field="query",
                )
            plan.append((study, series, expected))
    if not plan:
        raise DataError(
            f"dataset source {source.url!r}: the PACS has no series matching "
            f"{dict(source.filters) or 'the (empty) query'}; check the filters (values are case-sensitive)"
            + (
                "; some servers (Orthanc 1.10) do not decode spaces in queries: write ? or * in place of a space"
                if any(" " in v for v in source.filters.values())
                else ""
            ),
            host=source.host,
        )

    cache_dir = private_dir(Path(cache_dir))
    done = [0]
    total = listed

    def step(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    fetched = cached = instances = 0
    with _locked(cache_dir):
        _sweep_partials(cache_dir)
        for study, series, expected in plan:
            final = cache_dir / study / series
            if final.is_dir():
                present = sum(1 for f in final.iterdir() if f.suffix == ".dcm")
                if present and (expected is None or present == expected):
                    cached += 1
                    instances += present
                    step(present)
                    continue
            tmp = Path(tempfile.mkdtemp(prefix=_PARTIAL_PREFIX, dir=cache_dir))
            try:
                n = _fetch_series(client, source, study, series, expected, tmp, max_instances - instances, step)
                _replace_dir(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fetched += 1
            instances += n
        view = cache_dir / _VIEWS / source.key
        _link_view(cache_dir, view, [(study, series) for study, series, _ in plan])
    return Retrieval(
        root=view,
        studies=len({study for study, _, _ in plan}),
        series=len(plan),
        instances=instances,
        fetched=fetched,
        cached=cached,
    )


def stow(
    base_url: str,
    datasets_or_files: Sequence[pydicom.Dataset | Path],
    *,
    ca_file: Path | None = None,
    allow_plaintext: bool = False,
) -> int:
    """Upload instances with STOW-RS; the number the server stored.

    ``base_url`` is the DICOMweb root, as ``https://...`` or a ``dicomweb+https://...``
    source (its query is ignored); the same plaintext rule as for sources applies.
    A server that rejects any instance raises :class:`DataError` naming them.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    url = base_url if base_url.startswith("dicomweb+") else f"dicomweb+{base_url}"
    source = parse_dicomweb_source(urlsplit(url)._replace(query="").geturl(), allow_plaintext=allow_plaintext)
    client = _client(source, ca_file)
    items = list(datasets_or_files)
    stored = 0
    for start in range(0, len(items), _STOW_BATCH):
        batch: list[pydicom.Dataset] = []
        for item in items[start : start + _STOW_BATCH]:
            if isinstance(item, pydicom.Dataset):
                batch.append(item)
                continue
            try:
                batch.append(pydicom.dcmread(item))
            except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
                raise DataError(f"{item}: not a readable DICOM file ({exc}); nothing after it was sent",
                                file=str(item)) from exc  # fmt: skip
        with _translated(source, "storing instances (STOW-RS)"):
            reply = client.store_instances(batch)
        failed = [str(getattr(x, "ReferencedSOPInstanceUID", "?")) for x in getattr(reply, "FailedSOPSequence", [])]
        if failed:
            raise DataError(
                f"PACS {source.host}: STOW-RS refused {len(failed)} instance(s): {', '.join(failed[:5])}; "
                "see the PACS log for why",
                host=source.host,
            )
        stored += len(getattr(reply, "ReferencedSOPSequence", []))
    return stored


PACS_CACHE_DIR = "pacs-cache"
"""``home/pacs-cache``: series retrieved from PACSs, shared by every dataset registered from one."""


def register_pacs_dataset(
    catalog: Catalog,
    name: str,
    url: str,
    *,
    ca_file: Path | None = None,
    allow_plaintext: bool = False,
    max_studies: int = DEFAULT_MAX_STUDIES,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    labels: Path | None = None,
    tags: Sequence[str] = (),
    skip_bad: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, Retrieval]:
    """``laulima site dataset add NAME dicomweb+...``: query and retrieve into the site's PACS
    cache, then check and register exactly what the query matched, like a DICOM folder.

    The URL is validated before anything is contacted; the catalog keeps it as the dataset's
    source (kind ``dicomweb``), so ``dataset list`` says where the cases came from.
    """
    source = parse_dicomweb_source(url, allow_plaintext=allow_plaintext)
    cache = Path(catalog.home) / PACS_CACHE_DIR
    private_dir(cache)
    retrieval = retrieve(
        source, cache, ca_file=ca_file, max_studies=max_studies, max_instances=max_instances, progress=progress
    )
    path = catalog.add_dicom(
        name, retrieval.root, source=url, kind="dicomweb", labels=labels, tags=tags, skip_bad=skip_bad
    )
    return path, retrieval
