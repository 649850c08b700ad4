-- The outbox table of sagad's sqlite source (sagad-plugins(7)).
--
-- Create it in the service's database file:
--
--     sqlite3 /var/lib/orders/orders.db < schema.sql
--
-- The service inserts one row per message in the transaction that changes
-- its business data; sagad reads the rows in seq order, publishes them and
-- deletes them. SQLite 3.38 or later (JSON functions built in).
--
-- WAL mode lets sagad read without ever blocking the service; it is a
-- property of the file, so setting it once here is enough. The service's
-- connections should set a busy timeout (e.g. PRAGMA busy_timeout = 5000):
-- sagad takes the write lock for a moment to delete rows.

PRAGMA journal_mode = WAL;

CREATE TABLE IF NOT EXISTS sagad_outbox (
    -- Order of publication (the rowid). SQLite runs one write transaction
    -- at a time, so this is commit order.
    seq            INTEGER PRIMARY KEY,
    -- The AMQP message_id and sagad's dedup key: unique. The default is
    -- 32 random hex digits; a service usually sets its own (a UUID).
    message_id     TEXT NOT NULL UNIQUE DEFAULT (lower(hex(randomblob(16)))),
    exchange       TEXT NOT NULL DEFAULT '',    -- '' is the default exchange
    routing_key    TEXT NOT NULL,
    content_type   TEXT,
    correlation_id TEXT,
    -- AMQP headers: a JSON object as text; every value is sent as a string
    -- (non-string values as their text, nulls left out).
    headers        TEXT,
    -- The payload: a BLOB, or TEXT (sent as its UTF-8 bytes).
    body           BLOB NOT NULL DEFAULT x'',
    -- Unix time in seconds (a REAL); an ISO 8601 TEXT time is read too.
    created_at     REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);
