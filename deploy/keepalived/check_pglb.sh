#!/bin/sh
# keepalived track script (vrrp_script chk_pglb): exits 0 while pglb on this
# host serves, non-zero otherwise, so the virtual IP leaves a host whose
# pglb is stopped, crashed, hung or shutting down.
#
# GET /health is pglb's liveness — 200 while it serves, 503 once a shutdown
# has begun — not the database's: while PostgreSQL fails over, pglb still
# answers 200 on both hosts, and the VIP stays where it is.
#
# The URL is pglb's admin endpoint (admin.listen); pass another as $1.
# Install: install -m 0755 check_pglb.sh /etc/keepalived/check_pglb.sh
exec curl -fsS --max-time 1 -o /dev/null "${1:-http://127.0.0.1:9631/health}"
