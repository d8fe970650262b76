"""A bounded journal that stays auditable (``gateway archive``; migration 012 partitions
the journal by UTC month). A run, each step safe to repeat: creates partitions ahead;
takes a checkpoint (``gw_checkpoint``: each account's journal sums before the cut, a UTC
month start, journaled as one ``checkpoint`` row per account at the cut; from then on the
audit reads the journal from the cut, so nothing that follows changes an invariant);
exports each partition before the cut to a CSV file, checks its rows and sha256, and
detaches it; prunes the settled reservations whose rows are all archived into a file;
writes the checkpoint's manifest. Refused while a reservation made before the cut is held.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from gateway.errors import LedgerError, LedgerUnavailable
from gateway.ledger.records import Clock
from gateway.ledger.seam import _UNAVAILABLE, JOURNAL_STATEMENT_TIMEOUT, LedgerSeam

Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

FORMAT = "metering-gateway journal archive 1"
MONTHS_AHEAD = 3
KEEP_RESERVATIONS_DAYS = 30
DEFAULT_DIR = Path("journal-archive")
# Detaching or creating a partition locks the whole journal, and its writers queue behind
# the lock while it waits: wait briefly (so does gw_ensure_journal_partitions), a few times.
LOCK_TIMEOUT = "2s"
LOCK_ATTEMPTS = 5

T = TypeVar("T")

DESCRIPTION = """\
Archive the journal before --before (a UTC month): take a checkpoint (each account's
journal sums at the cut, journaled as 'checkpoint' rows), export each monthly partition
before the cut to DIR/journal_YYYY_MM.csv (CSV, header row, by id), check its rows and
sha256, then detach it (kept as journal_archived_YYYY_MM unless --drop). Settled
reservations whose rows are all archived, older than --keep-reservations-days, go to
DIR/reservations_pruned_<time>.csv. DIR/manifest_YYYY_MM.json lists every file. Refused
while a reservation made before the cut is held. Running it again finishes an
interrupted run. Exit status: 0 done or nothing to do, 1 refused or failed, 2 bad usage."""


def parse_month(text: str) -> datetime:
    """'2024-03' -> the first instant of March 2024, UTC."""
    try:
        month = datetime.strptime(text.strip(), "%Y-%m")
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a month like 2024-03") from None
    return month.replace(tzinfo=UTC)


def _days(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of days")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gateway archive``."""
    options: list[tuple[str, dict[str, Any]]] = [
        ("--before", {"required": True, "type": parse_month, "metavar": "YYYY-MM",
                      "help": "archive the months before this one (at most the current one)"}),
        ("--to", {"type": Path, "default": DEFAULT_DIR, "metavar": "DIR",
                  "help": f"directory for the files (default ./{DEFAULT_DIR})"}),
        ("--drop", {"action": "store_true",
                    "help": "drop each partition once exported and verified (default: keep "
                    "it detached, as journal_archived_YYYY_MM); for an archived period, drop "
                    "the kept partitions whose files in DIR still match their sha256"}),
        ("--dry-run", {"action": "store_true",
                       "help": "say what would be archived; change nothing"}),
        ("--keep-reservations-days", {
            "type": _days, "default": KEEP_RESERVATIONS_DAYS, "metavar": "DAYS",
            "help": "keep settled reservations (and their idempotency keys) at least this "
            f"long (default {KEEP_RESERVATIONS_DAYS})"}),
    ]  # fmt: skip
    for flag, kwargs in options:
        parser.add_argument(flag, **kwargs)


@dataclass(frozen=True)
class ArchivedPartition:
    partition: str  # journal_YYYY_MM
    month: datetime
    rows: int
    file: Path
    sha256: str
    kept_as: str | None  # the detached table; None when dropped


@dataclass
class ArchiveReport:
    """What one run did (with ``dry_run``: would do)."""

    cut: datetime
    dry_run: bool = False
    checkpoint_id: int | None = None
    new_checkpoint: bool = False
    accounts: int = 0  # accounts carried over by the checkpoint
    partitions_created: int = 0
    archived: list[ArchivedPartition] = field(default_factory=list)
    pending: list[tuple[str, int]] = field(default_factory=list)  # dry run: (partition, rows)
    dropped: list[str] = field(default_factory=list)
    pruned: int = 0
    pruned_file: Path | None = None
    manifests: list[Path] = field(default_factory=list)


def _month(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m")


@contextmanager
def _file_errors(path: Path) -> Iterator[None]:
    """File failures are refusals naming the file, not a ledger outage."""
    try:
        yield
    except OSError as exc:
        raise LedgerError("file_error", f"{path}: {exc.strerror or exc}") from exc


def _sha256(path: Path) -> str | None:
    """The file's sha256; None when there is no such file."""
    digest = hashlib.sha256()
    with _file_errors(path):
        if not path.exists():
            return None
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    with suppress(OSError):
        path.unlink()


async def _patiently(step: Callable[[], Awaitable[T]]) -> T:
    """Run a step that gives up on the journal's lock after LOCK_TIMEOUT, a few times."""
    for _ in range(LOCK_ATTEMPTS - 1):
        try:
            return await step()
        except asyncpg.LockNotAvailableError:
            await asyncio.sleep(1.0)
    return await step()


class JournalArchive(LedgerSeam):
    """Archiving the journal of one ledger (see the module's docstring)."""

    @classmethod
    def of(cls, ledger: LedgerSeam) -> Self:
        """The archive of ``ledger``'s journal: the same pool and clock, and statements
        allowed to run as long as a month of the journal takes."""
        return cls(ledger._pool, clock=ledger.clock, timeout=JOURNAL_STATEMENT_TIMEOUT)

    async def ensure_partitions(self, months_ahead: int = MONTHS_AHEAD) -> int:
        """Create the journal's monthly partitions from this month to ``months_ahead``
        months ahead, and those of rows the default partition caught. Returns how many
        were created; cheap when none are missing. For whatever runs periodically: a
        journal that stays locked for 2 s raises ``LedgerUnavailable`` (try again later;
        the default partition takes the rows meanwhile)."""
        return int(
            await self._fetchval(
                "SELECT gw_ensure_journal_partitions($1, $2)", self.clock(), months_ahead
            )
        )

    async def archive(
        self,
        before: datetime,
        to: Path = DEFAULT_DIR,
        *,
        drop: bool = False,
        dry_run: bool = False,
        keep_reservations_days: int = KEEP_RESERVATIONS_DAYS,
        actor: str = "operator",
        say: Callable[[str], object] = lambda line: None,
    ) -> ArchiveReport:
        """Archive the journal before the month of ``before`` into ``to`` (see the
        module's docstring); ``say`` hears each step as it is done.

        Raises ``LedgerError``: ``invalid_cut`` (a month after the current one),
        ``held_reservation`` (naming the oldest reservation held from before the cut),
        ``unpartitioned_rows``, ``rows_changed`` (a partition's rows differ from the
        checkpoint's count), ``file_mismatch``, ``file_missing``, ``file_error`` and
        ``busy`` (the journal stayed locked by other transactions); and
        ``LedgerUnavailable``. Nothing already done is undone by a refusal."""
        cut = before.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        report = ArchiveReport(cut=cut, dry_run=dry_run)
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                run = _Run(conn, report, to, self.clock, drop, keep_reservations_days, say)
                await (run.dry_run() if dry_run else run.archive(actor))
        except asyncpg.LockNotAvailableError as exc:
            raise LedgerError(
                "busy",
                f"the journal stayed locked by other transactions ({LOCK_ATTEMPTS} waits of "
                f"{LOCK_TIMEOUT}): this step changed nothing; run the command again",
            ) from exc
        except _UNAVAILABLE as exc:
            raise LedgerUnavailable(f"archive failed: {exc}") from exc
        return report


_BALANCES = (
    "SELECT checkpoint_id, org_id, token_type, allowance, purchased, reserved"
    " FROM checkpoint_balances WHERE checkpoint_id = $1 ORDER BY org_id, token_type"
)
_MONTH = "SELECT * FROM journal WHERE at >= $1 AND at < gw_month($1, 1) ORDER BY id"
_EXPORTED = "UPDATE archive_files SET file = $2, sha256 = $3, written_at = $4 WHERE id = $1"


@dataclass
class _Run:
    """One run, on one connection; every statement may take JOURNAL_STATEMENT_TIMEOUT (the pool's
    own timeout is the request path's)."""

    conn: Conn
    report: ArchiveReport
    to: Path
    clock: Clock
    drop: bool
    keep_days: int
    say: Callable[[str], object]

    def __post_init__(self) -> None:
        self.now, self.month = self.clock(), _month(self.report.cut)

    async def rows(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self.conn.fetch(query, *args, timeout=JOURNAL_STATEMENT_TIMEOUT))

    async def row(self, query: str, *args: Any) -> asyncpg.Record:
        return (await self.rows(query, *args))[0]

    async def value(self, query: str, *args: Any) -> Any:
        return (await self.row(query, *args))[0]

    async def ensure_partitions(self) -> int:
        query = "SELECT gw_ensure_journal_partitions($1, $2)"
        return int(await _patiently(lambda: self.value(query, self.now, MONTHS_AHEAD)))

    async def archive(self, actor: str) -> None:
        report = self.report
        report.partitions_created = await self.ensure_partitions()
        if report.partitions_created:
            self.say(f"created {report.partitions_created} journal partition(s) ahead")
        with _file_errors(self.to):
            self.to.mkdir(parents=True, exist_ok=True)
        await self.checkpoint(actor)
        touched: set[int] = set()  # the checkpoints whose manifest is due
        for row in await self.rows(
            "SELECT * FROM archive_files WHERE kind = 'checkpoint' AND sha256 IS NULL"
            " OR kind = 'journal' AND detached_at IS NULL AND month < $1 ORDER BY kind, month",
            report.cut,
        ):
            if row["kind"] == "checkpoint":
                name = f"checkpoint_{row['month']:%Y_%m}"
                await self.export(row, name, _BALANCES, row["checkpoint_id"])
            else:
                report.archived.append(await self.archive_partition(row))
            touched.add(row["checkpoint_id"])
        if self.drop:
            touched |= await self.drop_kept()
        touched |= await self.prune()
        for checkpoint_id in sorted(touched):
            manifest = await self.value("SELECT gw_archive_manifest($1)", checkpoint_id)
            document = {"format": FORMAT} | json.loads(manifest)
            cut = datetime.fromisoformat(document["checkpoint"]["cut"])
            path = self.to / f"manifest_{cut:%Y_%m}.json"
            with _file_errors(path):
                path.write_text(json.dumps(document, indent=2) + "\n")
            report.manifests.append(path)
            self.say(f"manifest: {path}")

    async def checkpoint(self, actor: str) -> None:
        """Take the checkpoint at the cut, or find the one already taken."""
        report = self.report
        row = await self.row("SELECT * FROM gw_checkpoint($1, $2, $3)", report.cut, self.now, actor)
        _refuse(row["status"], self.month, row["detail"])
        report.checkpoint_id, report.accounts = row["checkpoint_id"], row["accounts"]
        if row["status"] == "already_archived":
            self.say(f"the journal before {self.month} is already archived: {row['detail']}")
        else:
            report.new_checkpoint = True
            self.say(
                f"checkpoint {report.checkpoint_id}: the balances of {report.accounts} "
                f"account(s) before {self.month}, journaled"
            )
            # Its rows sit at the cut: give them their month's partition if the default
            # partition caught them.
            await self.ensure_partitions()

    async def export(
        self, row: asyncpg.Record, name: str, query: str, *args: Any
    ) -> tuple[Path, str]:
        """Export the rows of ``query`` to DIR/name.csv for ``row`` of archive_files, unless
        an interrupted run did: as many as the checkpoint counted. Returns (file, sha256)."""
        path = self.to / f"{name}.csv"
        if row["sha256"] is not None and _sha256(path) == row["sha256"]:
            return path, row["sha256"]
        rows, sha256 = await _export(self.conn, path, query, *args)
        if rows != row["rows"]:
            _remove(path)
            _refuse("rows_changed", self.month, f"{name} ({rows} exported, {row['rows']} counted)")
        await self.rows(_EXPORTED, row["id"], str(path.resolve()), sha256, self.clock())
        self.say(f"{name}: {rows} row(s) -> {path} (sha256 {sha256})")
        return path, sha256

    async def archive_partition(self, row: asyncpg.Record) -> ArchivedPartition:
        """Export one partition of the closed period, then detach it."""
        partition: str = row["partition"]
        # Through the partitioned table, bounded to the month: the rows of exactly this
        # partition, and no SQL built from its name.
        path, sha256 = await self.export(row, partition, _MONTH, row["month"])

        async def detach() -> asyncpg.Record:
            async with self.conn.transaction():
                await self.rows("SELECT set_config('lock_timeout', $1, true)", LOCK_TIMEOUT)
                return await self.row(
                    "SELECT * FROM gw_detach_journal_partition($1, $2, $3)",
                    partition,
                    not self.drop,
                    self.clock(),
                )

        detached = await _patiently(detach)
        _refuse(detached["status"], self.month, partition)
        kept_as = detached["kept_as"]
        self.say(f"{partition}: detached, " + (f"kept as {kept_as}" if kept_as else "dropped"))
        return ArchivedPartition(partition, row["month"], row["rows"], path, sha256, kept_as)

    async def drop_kept(self) -> set[int]:
        """Drop the kept partitions before the cut whose files in ``to`` still match."""
        touched: set[int] = set()
        for row in await self.rows(
            "SELECT * FROM archive_files WHERE kind = 'journal' AND kept_as IS NOT NULL"
            " AND month < $1 ORDER BY month",
            self.report.cut,
        ):
            path = self.to / Path(row["file"]).name
            if _sha256(path) != row["sha256"]:
                why = f"{path} is missing or no longer has sha256 {row['sha256']}"
                keep = f"{row['kept_as']} is kept; pass --to the directory holding the file"
                raise LedgerError("file_missing", f"{row['partition']}: {why}: {keep}")
            query = "SELECT gw_drop_archived_partition($1, $2)"
            if await self.value(query, row["partition"], self.clock()):
                self.report.dropped.append(row["kept_as"])
                touched.add(row["checkpoint_id"])
                self.say(f"{row['kept_as']}: dropped ({path} matches its sha256)")
        return touched

    async def prune(self) -> set[int]:
        """Prune settled reservations into a file, in the transaction that deletes them.
        Returns the checkpoint the file is filed under (none when nothing was pruned)."""
        path = self.to / f"reservations_pruned_{self.now.astimezone(UTC):%Y%m%dT%H%M%S%fZ}.csv"
        query = "SELECT * FROM gw_prune_reservations($1, $2, true)"
        try:
            async with self.conn.transaction():
                rows, sha256 = await _export(self.conn, path, query, self.now, self.keep_days)
                if rows == 0:
                    _remove(path)
                    self.say(f"no settled reservation to prune (kept: {self.keep_days} days)")
                    return set()
                checkpoint_id: int = await self.value(
                    "INSERT INTO archive_files (checkpoint_id, kind, rows, file, sha256,"
                    " written_at) SELECT max(id), 'reservations', $1, $2, $3, $4"
                    " FROM checkpoints RETURNING checkpoint_id",
                    rows,
                    str(path.resolve()),
                    sha256,
                    self.now,
                )
        except BaseException:
            _remove(path)
            raise
        self.report.pruned, self.report.pruned_file = rows, path
        self.say(f"pruned {rows} settled reservation(s) older than {self.keep_days} days -> {path}")
        return {checkpoint_id}

    async def dry_run(self) -> None:
        """What a run would refuse or archive (short of creating the partitions it lacks
        first): the checkpoint, taken and rolled back by gw_archive_dry_run."""
        report, month = self.report, self.month
        row = await self.row(
            "SELECT * FROM gw_archive_dry_run($1, $2, $3)", report.cut, self.now, self.keep_days
        )
        if row["status"] == "unpartitioned_rows":  # which a run first moves
            self.say(f"{row['detail']}: a run first moves them into their months' partitions")
            return
        _refuse(row["status"], month, row["detail"])
        if row["status"] == "already_archived":
            self.say(f"the journal before {month} is already archived: {row['detail']}")
        else:
            report.accounts = row["accounts"]
            self.say(
                f"would checkpoint the balances of {report.accounts} account(s) before {month}"
            )
        for pending in json.loads(row["partitions"]):
            report.pending.append((pending["partition"], pending["rows"]))
            self.say(f"would archive {pending['partition']}: {pending['rows']} row(s)")
        report.pruned = row["prunable"]
        self.say(
            f"would prune {report.pruned} settled reservation(s) older than {self.keep_days} days"
        )


async def _export(conn: Conn, path: Path, query: str, *args: Any) -> tuple[int, str]:
    """COPY the rows of ``query`` into ``path`` as CSV with a header row. The file appears
    whole or not at all (written aside, synced, renamed) and is read back against the
    sha256 of what the server sent. Returns (rows, sha256)."""
    partial = path.with_name(path.name + ".partial")
    digest = hashlib.sha256()
    with _file_errors(partial):
        out = partial.open("wb")

    async def write(chunk: bytes) -> None:
        digest.update(chunk)
        with _file_errors(partial):
            out.write(chunk)

    try:
        status = await conn.copy_from_query(
            query, *args, output=write, format="csv", header=True, timeout=JOURNAL_STATEMENT_TIMEOUT
        )
        with _file_errors(partial):
            out.flush()
            os.fsync(out.fileno())
            out.close()
            os.replace(partial, path)
    except BaseException:
        out.close()
        with suppress(OSError):
            partial.unlink()
        raise
    sha256 = digest.hexdigest()
    written = _sha256(path)
    if written != sha256:
        raise LedgerError(
            "file_mismatch", f"{path}: reads back as sha256 {written}, {sha256} was written"
        )
    return int(status.split()[-1]), sha256


_REFUSALS = {
    "invalid_cut": "cannot archive before {month}: {detail}",
    "held_reservation": "cannot archive before {month}: {detail}; settle it, or let it "
    "expire and be swept (gateway sweep), then run again",
    "unpartitioned_rows": "cannot archive before {month}: {detail} (their months were "
    "archived already, or their partitions could not be made): see the audit",
    "rows_changed": "cannot archive before {month}: the rows of {detail} differ from those "
    "counted at the checkpoint: rows were written into the archived period after it (see "
    "the audit); nothing was detached",
    "not_exported": "{detail}: not exported; nothing was detached",
    "not_found": "{detail}: no longer an attached partition of the journal (archived by "
    "another run?)",
}


def _refuse(status: str, month: str, detail: str | None) -> None:
    if status in _REFUSALS:
        raise LedgerError(status, _REFUSALS[status].format(month=month, detail=detail))


async def command(ledger: LedgerSeam, args: argparse.Namespace) -> int:
    """``gateway archive``: run, printing each step."""
    report = await JournalArchive.of(ledger).archive(
        args.before,
        args.to,
        drop=args.drop,
        dry_run=args.dry_run,
        keep_reservations_days=args.keep_reservations_days,
        actor="cli",
        say=print,
    )
    if not report.dry_run and not (report.new_checkpoint or report.archived or report.dropped):
        print(f"nothing more to archive before {_month(report.cut)}")
    return 0
