-- Protocol 2 workload: transactions larger than logical_decoding_work_mem
-- (64kB) so pgoutput streams them while in progress.
SELECT 'init' FROM pg_create_logical_replication_slot('s2', 'pgoutput');
BEGIN;
INSERT INTO bulk SELECT g, 'pad-' || g, 'ok' FROM generate_series(1, 2000) g;
SELECT 'msg' FROM pg_logical_emit_message(true, 'walbust', '{"keys":["s"]}');
UPDATE bulk SET id = 5000 WHERE id = 1;
DELETE FROM bulk WHERE id = 2;
ALTER TABLE bulk ADD COLUMN extra int;
INSERT INTO bulk VALUES (6000, 'late', 'sad', 42);
TRUNCATE bulk;
COMMIT;
BEGIN;
INSERT INTO bulk SELECT g, 'pad-' || g, 'ok' FROM generate_series(1, 2000) g;
ROLLBACK;
BEGIN;
INSERT INTO bulk VALUES (1, 'kept', 'ok', 1);
SAVEPOINT sp;
INSERT INTO bulk SELECT g, 'pad-' || g, 'ok' FROM generate_series(10, 2010) g;
ROLLBACK TO SAVEPOINT sp;
INSERT INTO bulk VALUES (2, 'kept too', 'ok', 2);
COMMIT;
