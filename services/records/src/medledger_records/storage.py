"""Records's tables and migrations. Its own tables arrive with the records issue; the common
outbox, inbox and idempotency tables are migrated by the runtime."""

from medledger_common.db import Migration

MIGRATIONS: list[Migration] = []
