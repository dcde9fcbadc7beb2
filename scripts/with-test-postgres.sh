#!/usr/bin/env bash
# Runs a command with one throwaway PostgreSQL cluster for all of it, its URL exported as
# KILN_TEST_POSTGRES_URL (see libs/testkit): nextest runs every test in a process of its
# own, and a cluster per test process would cost a server start each. The cluster stops
# when this script ends, however it ends: kiln-test-postgres keeps it until its stdin (a
# pipe from here) closes. Without PostgreSQL binaries the command runs without the
# variable, and each Postgres half of a test says it skipped.
set -euo pipefail
bin=$1
shift
coproc PG { exec "$bin"; }
if read -r url <&"${PG[0]}"; then
    export KILN_TEST_POSTGRES_URL="$url"
    echo "test PostgreSQL cluster: $url"
else
    echo "no test PostgreSQL cluster (see above): Postgres halves of tests will skip"
fi
"$@"
