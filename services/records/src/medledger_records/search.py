"""FHIR search in the patient's compartment without plaintext: the blind index written with every
FHIR version (:class:`SearchIndex`) and the search use case (:class:`SearchDesk`).

Tokens are exact matches through a blind index: the patient's search key
``records-search-<id>`` (an ``hmac`` key in the key manager, version 1 pinned so an index never
changes) gives, in ONE key-manager call, the request's index key (the HMAC of
:data:`INDEX_KEY_INPUT`), under which each term (``search_terms.term``: resource type, parameter,
form, system, code) is HMACed in process. Only those HMACs are stored, with the record id. The
index key is kept as a data key is (data_keys.py, within its age limit), and is gone with the
search key at erasure.

Dates are matched by decrypt-and-filter: the candidates SQL leaves (compartment, type, permitted
categories, `_id`, `_lastUpdated`, tokens) are decrypted within the patient's compartment and
their clinical date compared (``search_terms.date_matches``); no date is stored anywhere.

Key-manager calls: a FHIR write, one ``hmac`` for the patient's index key (kept by the data-key
cache within its age limit, as a data key is: none for a patient seen lately), plus ``ensure_key``
of the search key, cached too; a search, the same ``hmac`` when it has token matches, plus one data-key unwrap
per distinct data key among the records it decrypts (the page's, for their content; with a date
match, every candidate's), each a hit of the data-key cache within its age limit.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from medledger_records import domain, erasure_storage, search_storage, search_terms, storage
from medledger_records.erasure_runner import COMPLETED, RUNNING
from medledger_records.record_commands import ConsentService, Receipt
from medledger_records.records import RecordDesk, receipt
from medledger_runtime.auth import Caller
from medledger_runtime.db import Database
from medledger_runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    MedledgerError,
    NotFound,
    ResourceExhausted,
)
from medledger_runtime.fhir_search import DATE_ELEMENTS, DATE_PARAMETER, TOKEN_PARAMETERS
from medledger_runtime.keys import KeyInfo, KeyType, patient_key_name
from medledger_runtime.keys.wire import b64decode_strict, parse_versioned
from medledger_runtime.retry import retry

log = logging.getLogger(__name__)
INDEX_KEY_INPUT = b"medledger:records-search:index-key:v1"
SEARCH_KEY_VERSION = 1
# A date search decrypts its candidates: at most this many (narrow it with tokens, `_id` or
# `_lastUpdated` beyond).
MAX_DATE_CANDIDATES = 5000


class SearchKeys(Protocol):
    """What the index needs of records' everyday key manager (data_keys.DataKeyCache)."""

    async def ensure_key(self, name: str, key_type: KeyType | str) -> KeyInfo: ...
    async def hmac(self, name: str, data: bytes, *, key_version: int | None = None) -> str: ...


def search_key_name(patient_id: str) -> str:
    return patient_key_name("records-search", patient_id)


class SearchIndex:
    """The blind index of FHIR search terms, written in the transaction of every FHIR version."""

    def __init__(self, keys: SearchKeys) -> None:
        self.keys = keys

    async def index(
        self, conn: AsyncConnection, patient_id: str, record_id: str, resource_type: str, content: bytes
    ) -> None:
        """The record's index becomes its new version's terms."""
        if not resource_type:
            return  # a document: never indexed
        await search_storage.replace_terms(conn, patient_id, record_id, await self.hashes(patient_id, content))

    async def hashes(self, patient_id: str, content: bytes) -> list[bytes]:
        """A FHIR version's terms as the index holds them (a PutRecords writes many at once)."""
        terms = search_terms.resource_terms(json.loads(content))
        if not terms:
            return []
        name = search_key_name(patient_id)
        await self.keys.ensure_key(name, KeyType.HMAC)
        return blind(await self._index_key(name), terms)

    async def query_hashes(self, patient_id: str, terms: Sequence[Sequence[bytes]]) -> list[list[bytes]] | None:
        """Each match's terms as the index holds them; None when the patient has no search key
        (nothing of theirs was ever indexed, or it was erased)."""
        try:
            key = await self._index_key(search_key_name(patient_id))
        except NotFound:
            return None
        return [blind(key, match) for match in terms]

    async def _index_key(self, name: str) -> bytes:
        """One key-manager call: the index key of this request."""
        mac = await self.keys.hmac(name, INDEX_KEY_INPUT, key_version=SEARCH_KEY_VERSION)
        return b64decode_strict(parse_versioned(mac, what="hmac")[1])


def blind(index_key: bytes, terms: Iterable[bytes]) -> list[bytes]:
    return [hmac.digest(index_key, t, "sha256") for t in terms]


class SearchBackfill:
    """Indexes the FHIR records written before the index existed: at start, then hourly (a replica
    of the previous release may still write during a rolling update). Each record is indexed in
    its own transaction under the same locks as a write (the patient's, shared with puts and
    exclusive with the start of an erasure; then the record's row), from its latest version. A
    record whose resource has no term at all is looked at again by each pass."""

    def __init__(self, db: Database, records: RecordDesk, index: SearchIndex, *, page: int = 100) -> None:
        self.db = db
        self.records = records
        self.index = index
        self.page = page

    async def run(self) -> int:
        """One pass; how many records it indexed."""
        after, indexed = "", 0
        while True:
            async with self.db.read() as conn:
                ids = await search_storage.unindexed_after(conn, list(TOKEN_PARAMETERS), after, self.page)
            for record_id in ids:
                indexed += await self._index(record_id)
            if len(ids) < self.page:
                break
            after = ids[-1]
        if indexed:
            log.info("records written before the search index were indexed", extra={"records": indexed})
        return indexed

    async def _index(self, record_id: str) -> bool:
        async with self.db.transaction() as conn:
            found = await storage.get_record(conn, record_id)
            if found is None:
                return False
            await storage.lock_patient(conn, found.patient_id, exclusive=False)
            if await erasure_storage.erasures_of(conn, found.patient_id, [RUNNING, COMPLETED]):
                return False  # its keys are (being) destroyed: never make a search key again
            record = await storage.get_record(conn, record_id, for_update=True)
            if record is None or record.erased_at is not None or record.media_type != domain.FHIR_JSON:
                return False
            stored = await storage.get_version(conn, record_id, record.latest_version)
            if stored is None:
                return False
            content = await self.records._open(record, stored)
            await self.index.index(conn, record.patient_id, record_id, record.resource_type, content)
        return True

    async def keep_running(self, every: float = 3600.0) -> None:
        """The background job: :meth:`run` at start and then every `every` seconds, never ending;
        an outage is waited out, another failure logged and tried again at the next pass."""
        while True:
            try:
                await retry(self.run, "search index backfill", only_outages=True)
            except MedledgerError as exc:
                log.warning("the search index backfill stopped; trying again later", extra={"error": str(exc)})
            await asyncio.sleep(every)


# The use case.


@dataclass(frozen=True)
class TokenMatch:
    parameter: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class DateMatch:
    parameter: str
    value: str


@dataclass(frozen=True)
class SearchRecords:
    patient_id: str
    resource_type: str
    tokens: tuple[TokenMatch, ...] = ()
    dates: tuple[DateMatch, ...] = ()
    record_ids: tuple[str, ...] = ()
    last_updated: tuple[str, ...] = ()
    purpose: int = 0
    page_size: int = 0
    page_token: str = ""
    count_only: bool = False


@dataclass(frozen=True)
class Found:
    record: storage.Record
    content: bytes
    receipt: Receipt


@dataclass(frozen=True)
class SearchResult:
    records: list[Found]
    next_page_token: str
    total: int
    decision_ids: list[str]


@dataclass(frozen=True)
class _Query:
    """A search, checked: term bytes per token match, date criteria, `_lastUpdated` bounds."""

    tokens: list[list[bytes]]
    dates: list[tuple[str, search_terms.DateRange]]
    updated: list[tuple[float | None, float | None]]
    after: tuple[float, str] | None
    size: int


def check_search(command: SearchRecords) -> _Query:
    """Every field, before anything is asked or logged: InvalidArgument names the field."""
    st = search_terms
    if not command.patient_id:
        raise InvalidArgument.field("patient_id", "required")
    resource_type = st.check_resource_type(command.resource_type)
    if len(command.tokens) > st.MAX_TOKEN_MATCHES:
        raise InvalidArgument.field("tokens", f"at most {st.MAX_TOKEN_MATCHES} token matches")
    tokens = []
    for i, match in enumerate(command.tokens):
        st.check_token_parameter(resource_type, match.parameter, f"tokens[{i}].parameter")
        if not match.values or len(match.values) > st.MAX_VALUES_PER_MATCH:
            raise InvalidArgument.field(f"tokens[{i}].values", f"1 to {st.MAX_VALUES_PER_MATCH} values")
        tokens.append(
            [
                st.query_term(resource_type, match.parameter, value, f"tokens[{i}].values[{j}]")
                for j, value in enumerate(match.values)
            ]
        )
    if len(command.dates) > st.MAX_DATE_MATCHES:
        raise InvalidArgument.field("dates", f"at most {st.MAX_DATE_MATCHES} date matches")
    dates = []
    for i, date in enumerate(command.dates):
        if date.parameter != DATE_PARAMETER or resource_type not in DATE_ELEMENTS:
            raise InvalidArgument.field(f"dates[{i}].parameter", f"only `date`, on {', '.join(sorted(DATE_ELEMENTS))}")
        dates.append(st.parse_date_query(date.value, f"dates[{i}].value"))
    if len(command.record_ids) > st.MAX_RECORD_IDS:
        raise InvalidArgument.field("record_ids", f"at most {st.MAX_RECORD_IDS} ids")
    for i, record_id in enumerate(command.record_ids):
        if not record_id or len(record_id) > 64:
            raise InvalidArgument.field(f"record_ids[{i}]", "a record id")
    if len(command.last_updated) > st.MAX_LAST_UPDATED:
        raise InvalidArgument.field("last_updated", f"at most {st.MAX_LAST_UPDATED} values")
    updated = []
    for i, value in enumerate(command.last_updated):
        prefix, wanted = st.parse_date_query(value, f"last_updated[{i}]")
        if prefix not in st.LAST_UPDATED_PREFIXES:
            raise InvalidArgument.field(
                f"last_updated[{i}]", f"prefixes: {', '.join(sorted(st.LAST_UPDATED_PREFIXES))}"
            )
        updated.append(st.last_updated_bounds(prefix, wanted))
    if command.page_size < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    after = _page_position(command.page_token) if command.page_token else None
    return _Query(tokens, dates, updated, after, domain.page_size(command.page_size))


class SearchDesk:
    """SearchRecords: the records use cases' consent, guardians, decryption and disclosure
    events (through `records`), over the blind index."""

    def __init__(
        self, db: Database, records: RecordDesk, index: SearchIndex, consent: ConsentService | None = None
    ) -> None:
        self.db = db
        self.records = records
        self.index = index
        self.consent = consent or records.consent

    async def search(self, caller: Caller, command: SearchRecords) -> SearchResult:
        """The matching FHIR resources of the patient that the caller may read. A caller other
        than the patient or their guardian is asked about once per category of the patient's
        resources of this type (all at once); only permitted categories are searched, so
        `total` and paging count nothing denied. RecordsListed ("search", or "search-count"
        for `count_only`) with the page's ids is durable before the answer."""
        query = check_search(command)
        patient_id = command.patient_id
        guardian = await self.records._is_guardian(caller, patient_id)
        ask = domain.list_needs_consent(caller, patient_id, command.purpose, guardian=guardian)
        async with self.db.read() as conn:
            if await erasure_storage.erasures_of(conn, patient_id, [RUNNING, COMPLETED]):
                raise FailedPrecondition("this patient's records were erased")
            categories = await search_storage.categories_of(conn, patient_id, command.resource_type)
        decision_ids: list[str] = []
        if ask and categories:
            answers = await asyncio.gather(
                *(
                    self.consent.check(caller, patient_id, domain.READ, category, command.purpose)
                    for category in categories
                )
            )
            categories = [c for c, a in zip(categories, answers, strict=True) if a.permit]
            decision_ids = [a.decision_id for a in answers if a.permit]
        page: list[Found] = []
        total, next_token = 0, ""
        hashes: list[list[bytes]] | None = []
        if categories and query.tokens:
            hashes = await self.index.query_hashes(patient_id, query.tokens)
        if categories and hashes is not None:
            criteria = search_storage.Criteria(
                patient_id, command.resource_type, categories, command.record_ids, query.updated, hashes
            )
            if query.dates:
                total, page, next_token = await self._with_dates(criteria, query, command.count_only)
            else:
                total, page, next_token = await self._in_sql(criteria, query, command.count_only)
        await self.records._announce_listing(
            caller,
            patient_id,
            [f.record for f in page],
            decision_ids,
            command.purpose,
            "search-count" if command.count_only else "search",
            guardian=guardian,
        )
        return SearchResult(page, next_token, total, decision_ids)

    async def _in_sql(
        self, criteria: search_storage.Criteria, query: _Query, count_only: bool
    ) -> tuple[int, list[Found], str]:
        async with self.db.read() as conn:
            total = await search_storage.count(conn, criteria)
            if count_only:
                return total, [], ""
            found = await search_storage.find(conn, criteria, after=query.after, limit=query.size + 1)
            more = len(found) > query.size
            found = found[: query.size]
            versions = await search_storage.latest_versions(conn, found)
        page = [await self._found(r, versions[r.record_id]) for r in found if r.record_id in versions]
        return total, page, _next(found) if more else ""

    async def _with_dates(
        self, criteria: search_storage.Criteria, query: _Query, count_only: bool
    ) -> tuple[int, list[Found], str]:
        """Decrypt-and-filter: every candidate SQL leaves is opened and its date compared."""
        async with self.db.read() as conn:
            candidates = await search_storage.find(conn, criteria, limit=MAX_DATE_CANDIDATES + 1)
            if len(candidates) > MAX_DATE_CANDIDATES:
                raise ResourceExhausted(
                    f"a date search compares at most {MAX_DATE_CANDIDATES} resources: narrow it with "
                    "tokens, _id or _lastUpdated"
                )
            versions = await search_storage.latest_versions(conn, candidates)
        now = datetime.now(UTC)
        matched: list[Found] = []
        for record in candidates:
            stored = versions.get(record.record_id)
            if stored is None:
                continue
            found = await self._found(record, stored)
            date = search_terms.resource_date(json.loads(found.content))
            if date is not None and all(search_terms.date_matches(p, w, date, now) for p, w in query.dates):
                matched.append(found)
        if count_only:
            return len(matched), [], ""
        start = 0
        if query.after is not None:
            position = query.after
            start = next(
                (i for i, f in enumerate(matched) if (f.record.updated_at, f.record.record_id) < position),
                len(matched),
            )
        page = matched[start : start + query.size]
        more = start + query.size < len(matched)
        return len(matched), page, _next([f.record for f in page]) if more else ""

    async def _found(self, record: storage.Record, stored: storage.StoredVersion) -> Found:
        return Found(record, await self.records._open(record, stored), receipt(stored))


def _next(page: Sequence[storage.Record]) -> str:
    """An opaque token: where the next page starts, in ListRecords' order."""
    position = domain.page_token(page[-1].updated_at, page[-1].record_id)
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def _page_position(token: str) -> tuple[float, str]:
    try:
        position = b64decode_strict(token, urlsafe=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument.field("page_token", "not a token this RPC returned") from None
    return domain.page_position(position)
