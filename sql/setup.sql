-- What a DBA runs once for walbust, shown for the example config (config.toml,
-- rules/demo.toml, sql/demo.sql). Run as a superuser in the application database.

-- 1. postgresql.conf (needs a restart): logical decoding and room for the slot.
--    wal_level = logical
--    max_replication_slots = 10      -- at least one per walbust
--    max_wal_senders = 10

-- 2. The role walbust logs in as: replication, and read access to the catalog only.
CREATE ROLE walbust LOGIN REPLICATION PASSWORD 'change me';

-- 3. The publication over the tables the rules name, with TRUNCATE published.
CREATE PUBLICATION walbust FOR TABLE public.user_settings, public.plans;

-- 4. Rules keyed on columns outside the primary key need those columns in the old image
--    of UPDATEs and DELETEs; without it walbust widens the old side to a pattern delete.
ALTER TABLE public.plans REPLICA IDENTITY FULL;
