-- walbust setup for database app, generated from config.toml.
-- Run as a superuser connected to app, e.g. psql -d app -f setup.sql
-- postgresql.conf needs wal_level = logical, and max_replication_slots and
-- max_wal_senders of at least 1 each for walbust (changing wal_level needs a restart).

BEGIN;

-- The role walbust logs in as: LOGIN and REPLICATION, no superuser; created unless a role
-- of that name exists, which is left as it is. pgoutput sends rows through the
-- publication, so it needs no SELECT on the tables. Give it a password with
-- \password "walbust" (or another method in pg_hba.conf); keep it out of config.toml.
DO $walbust$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'walbust') THEN
    CREATE ROLE "walbust" LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;
  END IF;
END
$walbust$;
GRANT CONNECT ON DATABASE "app" TO "walbust";

-- The publication: the tables the rules name, with TRUNCATE published; created unless a
-- publication of that name exists, which is left as it is.
DO $walbust$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'walbust') THEN
    CREATE PUBLICATION walbust FOR TABLE public.plans, public.user_settings WITH (publish = 'insert, update, delete, truncate');
  END IF;
END
$walbust$;

-- Manual invalidations ride pg_logical_emit_message(true, 'walbust', ...), so only the
-- application roles that send them keep it: "app". walbust's role keeps it
-- for its heartbeats. Revokes EXECUTE from PUBLIC on every overload ((boolean, text, text)
-- and (boolean, text, bytea), each with a flush argument on Postgres 17 and later).
DO $walbust$
DECLARE f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
           WHERE p.proname = 'pg_logical_emit_message' AND p.pronamespace = 'pg_catalog'::regnamespace
  LOOP
    EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, '"walbust", "app"');
  END LOOP;
END
$walbust$;

-- Read-your-writes: after its own COMMIT, an application calls SELECT walbust.wait();
-- it returns true once walbust has applied the invalidations up to that commit in Redis,
-- false after the timeout (2s unless given).
CREATE SCHEMA IF NOT EXISTS walbust;
CREATE SEQUENCE IF NOT EXISTS walbust.wait_answered;
CREATE SEQUENCE IF NOT EXISTS walbust.wait_timed_out;
CREATE OR REPLACE FUNCTION walbust.wait(timeout interval DEFAULT '2s') RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $wait$
DECLARE
  target pg_lsn := pg_current_wal_insert_lsn();
  page_offset bigint := (target - '0/0'::pg_lsn)::numeric % current_setting('wal_block_size')::numeric;
  segment_offset bigint := (SELECT file_offset FROM pg_walfile_name_offset(target));
  deadline timestamptz := clock_timestamp() + timeout;
  pause float8 := 0.0002;
  done boolean;
BEGIN
  IF segment_offset = 40 THEN target := target - 40;
  ELSIF page_offset = 24 THEN target := target - 24;
  END IF;
  LOOP
    done := EXISTS (SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
                    WHERE s.slot_name = 'walbust' AND r.write_lsn >= target);
    EXIT WHEN done OR clock_timestamp() >= deadline;
    PERFORM pg_sleep(pause);
    pause := least(pause * 2, 0.005);
  END LOOP;
  BEGIN
    PERFORM nextval(CASE WHEN done THEN 'walbust.wait_answered' ELSE 'walbust.wait_timed_out' END::regclass);
  EXCEPTION WHEN read_only_sql_transaction THEN NULL;
  END;
  RETURN done;
END
$wait$;
GRANT USAGE ON SCHEMA walbust TO PUBLIC;

-- Replica identity: old-row columns the rules read.
-- public.plans: rule "plan lists" reads org_slug, provider from old rows, which REPLICA IDENTITY DEFAULT (primary key plans_pkey: id) leaves out of UPDATE and
-- DELETE; without FULL walbust widens those keys to pattern deletes.
ALTER TABLE public.plans REPLICA IDENTITY FULL;

COMMIT;
