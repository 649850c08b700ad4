-- The outbox table of sagad's pgsql source (sagad-plugins(7)).
--
-- Create it in the service's database, in the schema the service uses:
--
--     psql -d orders -f schema.sql
--
-- The service inserts one row per message in the transaction that changes
-- its business data; sagad reads the rows in seq order, publishes them and
-- deletes them. PostgreSQL 13 or later (gen_random_uuid); on 10 to 12 drop
-- the message_id default or use pgcrypto's gen_random_uuid().
--
-- Another name: replace sagad_outbox everywhere below and set `table` in the
-- source's configuration. The trigger NOTIFYs on the channel named like the
-- table (without schema), which is what sagad LISTENs to by default.

CREATE TABLE IF NOT EXISTS sagad_outbox (
    -- Order of publication. Assigned at INSERT: rows of one transaction,
    -- and the transactions of one writer, are published in this order.
    seq            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The AMQP message_id and sagad's dedup key: unique.
    message_id     text NOT NULL UNIQUE DEFAULT gen_random_uuid()::text,
    exchange       text NOT NULL DEFAULT '',    -- '' is the default exchange
    routing_key    text NOT NULL,
    content_type   text,
    correlation_id text,
    -- AMQP headers: a JSON object; every value is sent as a string
    -- (non-string values as their JSON text, nulls left out).
    headers        jsonb,
    -- The payload. text, json and jsonb columns are accepted too (sent as
    -- their UTF-8 text).
    body           bytea NOT NULL DEFAULT '\x',
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- One notification per INSERT statement (PostgreSQL folds identical
-- notifications of one transaction into one, delivered at COMMIT).
CREATE OR REPLACE FUNCTION sagad_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_NAME, '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS sagad_outbox_notify ON sagad_outbox;
CREATE TRIGGER sagad_outbox_notify
    AFTER INSERT ON sagad_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION sagad_outbox_notify();

-- sagad's database role needs SELECT, UPDATE (for FOR UPDATE) and DELETE:
--     GRANT SELECT, UPDATE, DELETE ON sagad_outbox TO sagad;
-- and the service's role INSERT:
--     GRANT INSERT ON sagad_outbox TO orders;
