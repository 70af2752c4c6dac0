-- Tables for the walbust pgoutput fixtures. Run once on an empty database.
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE items (id int PRIMARY KEY, name text, price numeric, mood mood, note text);
CREATE TABLE audit (id int PRIMARY KEY, item_id int, what text);
ALTER TABLE audit REPLICA IDENTITY FULL;
CREATE TABLE docs (id int PRIMARY KEY, body text, rev int);
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE codes (code text NOT NULL, region text NOT NULL, label text);
CREATE UNIQUE INDEX codes_code_region ON codes (code, region);
ALTER TABLE codes REPLICA IDENTITY USING INDEX codes_code_region;
CREATE TABLE events (at timestamptz, payload text);
ALTER TABLE events REPLICA IDENTITY NOTHING;
CREATE TABLE parent (id serial PRIMARY KEY);
CREATE TABLE child (id serial PRIMARY KEY, parent_id int REFERENCES parent (id));
CREATE TABLE bulk (id int PRIMARY KEY, pad text, mood mood);
-- A > 2 kB uncompressed value stored out of line, written before any slot
-- exists so the fixtures never carry it; the v1 workload only updates a
-- sibling column, which makes pgoutput send the 'u' (unchanged TOAST) kind.
INSERT INTO docs SELECT 1, string_agg(md5(random()::text), ''), 1 FROM generate_series(1, 100);
CREATE PUBLICATION pub FOR ALL TABLES;
SELECT pg_replication_origin_create('upstream');
