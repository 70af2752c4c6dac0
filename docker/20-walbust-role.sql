-- The walbust login for docker-compose.yml; its password comes from PGPASSWORD there.
CREATE ROLE walbust LOGIN REPLICATION PASSWORD 'walbust';
