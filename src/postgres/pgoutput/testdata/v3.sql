-- Protocol 3 workload: two-phase commit on a slot created with two_phase.
SELECT 'init' FROM pg_create_logical_replication_slot('s3', 'pgoutput', false, true);
BEGIN;
INSERT INTO items (id, name) VALUES (50, 'kiwi');
PREPARE TRANSACTION 'walbust-commit';
COMMIT PREPARED 'walbust-commit';
BEGIN;
INSERT INTO items (id, name) VALUES (51, 'lime');
PREPARE TRANSACTION 'walbust-rollback';
ROLLBACK PREPARED 'walbust-rollback';
BEGIN;
INSERT INTO bulk SELECT g, 'pad-' || g, 'ok' FROM generate_series(100000, 102000) g;
PREPARE TRANSACTION 'walbust-stream';
COMMIT PREPARED 'walbust-stream';
