#!/bin/sh
# First start: create the cluster, a login role and its database. Then run PostgreSQL
# on 127.0.0.1:$PGPORT (password auth over TCP, peer auth on the local socket).
set -eu
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD (for the role POSTGRES_USER)}"
user=${POSTGRES_USER:-diffcast}
db=${POSTGRES_DB:-diffcast}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  as_postgres initdb -D "$PGDATA" -U postgres -E UTF8 --locale=C.UTF-8 \
    --auth-local=peer --auth-host=scram-sha-256
  as_postgres pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p $PGPORT" -w start
  as_postgres psql -q -p "$PGPORT" -U postgres -v ON_ERROR_STOP=1 \
    -v user="$user" -v password="$POSTGRES_PASSWORD" -v db="$db" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"user";
SQL
  as_postgres pg_ctl -D "$PGDATA" -m fast -w stop
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups \
  postgres -D "$PGDATA" -c listen_addresses=127.0.0.1 -p "$PGPORT"
