#!/usr/bin/env bash
# Make sure RabbitMQ, Redis and PostgreSQL answer where Longhaul expects them.
#
# For each one: reachable -> nothing to do; server installed -> start it; not installed
# -> apt-get install it, then start it. Addresses come from LONGHAUL_AMQP_URL,
# LONGHAUL_REDIS_URL and LONGHAUL_DATABASE_URL (contract defaults otherwise); with
# --bench, from the benchmark's LONGHAUL_BENCH_AMQP_URL, LONGHAUL_BENCH_REDIS_URL and
# LONGHAUL_BENCH_PG_URL (bench/infra.py, same defaults); with --test, from the tests'
# LONGHAUL_TEST_AMQP_URL, LONGHAUL_TEST_REDIS_URL and LONGHAUL_TEST_PG_URL
# (tests/conftest.py, same defaults). Only a server on this machine
# (127.0.0.1, localhost, ::1) is started or installed, a remote one is only checked. A
# URL that names a Unix socket (unix://, PostgreSQL's host=/dir) is checked on the socket;
# a PostgreSQL URL with no host where asyncpg would look (PGHOST, its socket directories,
# localhost).
# Idempotent, and quick when everything is already up.
#
# Exit 0 when all three are reachable; otherwise one line naming what is missing, exit 1.
set -euo pipefail

cd "$(dirname "$0")/.."
mkdir -p .run
LOG="$PWD/.run/services.log"   # apt and server start-up output, kept out of the terminal

if [[ ${1:-} == --bench ]]; then
  AMQP_URL="${LONGHAUL_BENCH_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
  REDIS_URL="${LONGHAUL_BENCH_REDIS_URL:-redis://127.0.0.1:6379/0}"
  DATABASE_URL="${LONGHAUL_BENCH_PG_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
  DATABASE_VAR=LONGHAUL_BENCH_PG_URL
elif [[ ${1:-} == --test ]]; then
  AMQP_URL="${LONGHAUL_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
  REDIS_URL="${LONGHAUL_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"
  DATABASE_URL="${LONGHAUL_TEST_PG_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
  DATABASE_VAR=LONGHAUL_TEST_PG_URL
elif [[ $# -eq 0 ]]; then
  AMQP_URL="${LONGHAUL_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
  REDIS_URL="${LONGHAUL_REDIS_URL:-redis://127.0.0.1:6379/0}"
  DATABASE_URL="${LONGHAUL_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/longhaul}"
  DATABASE_VAR=LONGHAUL_DATABASE_URL
else
  echo "usage: $0 [--bench | --test]" >&2
  exit 2
fi

say() { printf 'ensure-services: %s\n' "$*" >&2; }

# %XX escapes decoded (a socket path may be written %2F...). Backslashes are doubled
# first: printf's %b would read a path's own "\c" as "stop here", "\n" as a newline.
url_decode() {
  local text="${1//\\/\\\\}"
  printf '%b' "${text//%/\\x}"
}

# query_pairs URL NAME... -> the URL's NAME=value query pairs as written, joined by "&".
query_pairs() {
  [[ $1 == *\?* ]] || return 0
  local query="${1#*\?}" pair name pairs out=()
  IFS='&' read -ra pairs <<<"${query%%#*}"
  for pair in "${pairs[@]}"; do
    for name in "${@:2}"; do [[ $pair == "$name="* ]] && out+=("$pair"); done
  done
  local IFS='&'
  echo "${out[*]}"
}

query_param() { # URL NAME -> the decoded value of the first NAME= in the query
  local pair
  pair=$(query_pairs "$1" "$2")
  pair="${pair%%&*}"
  [[ -z $pair ]] || url_decode "${pair#*=}"
}

# address URL DEFAULT_PORT -> "port host" (IPv6 brackets removed) for TCP, or
# "unix path" for a Unix socket: a unix:// URL (Redis; the path is the socket), or a
# PostgreSQL host that is a directory, in a host= query option or %2F-encoded (libpq:
# the socket is dir/.s.PGSQL.port; host= and port= in the query win over the URL's).
# The port comes first: a socket path may contain spaces.
address() {
  local url=$1 rest
  if [[ $url == unix://* ]]; then
    rest="${url#unix://}"
    [[ ${rest%%/*} != *@* ]] || rest="${rest#*@}" # user:password@
    rest="${rest%%[?#]*}"
    [[ $rest == /* ]] || { echo "cannot parse the socket path in '$url'" >&2; return 1; }
    echo "unix $(url_decode "$rest")"
    return 0
  fi
  local re='^[A-Za-z0-9+.-]+://([^@/]*@)?(\[[^]/]+\]|[^:/?#]+)?(:([0-9]+))?'
  if [[ ! $url =~ $re ]]; then
    echo "cannot parse the address in '$url'" >&2
    return 1
  fi
  local host port="${BASH_REMATCH[4]:-$2}" url_port="${BASH_REMATCH[4]}"
  host=$(url_decode "${BASH_REMATCH[2]}")
  if [[ $url == postgres* ]]; then
    local q
    q=$(query_param "$url" host)
    host="${q:-$host}"
    q=$(query_param "$url" port)
    # No port in the URL: asyncpg (and psql) take PGPORT before the default.
    port="${q:-${url_port:-${PGPORT:-$2}}}"
    # No host in the URL: asyncpg (the services' client) takes PGHOST, else tries its
    # default socket directories and then localhost.
    [[ -n $host ]] || host="${PGHOST:-}"
    if [[ $host == /* ]]; then
      echo "unix ${host%/}/.s.PGSQL.$port"
      return 0
    fi
    if [[ -z $host ]]; then
      echo "$port default"
      return 0
    fi
  fi
  host="${host:-127.0.0.1}"
  host="${host#[}"
  echo "$port ${host%]}"
}

is_local() { [[ $1 == 127.0.0.1 || $1 == localhost || $1 == ::1 || $1 == default ]]; }

# The Python that connects to a Unix socket (bash cannot): the project's, else any.
SOCKET_PY=python3
[[ -x .venv/bin/python ]] && SOCKET_PY=.venv/bin/python

# Where asyncpg looks for PostgreSQL when the URL and PGHOST name no host, before localhost;
# and the first of them (or 127.0.0.1) found listening, for psql, which looks elsewhere.
PG_SOCKET_DIRS=(/run/postgresql /var/run/postgresql /tmp /private/tmp)
PG_DEFAULT_HOST=

# reachable HOST PORT, or reachable PATH unix, or reachable default PORT (PostgreSQL
# with no host: its default sockets, then loopback). A connect is enough to know the server
# listens; the protocol is checked by the services themselves (and, for PostgreSQL, by
# check_pg_login below).
reachable() {
  if [[ $1 == default ]]; then
    local dir
    for dir in "${PG_SOCKET_DIRS[@]}"; do
      reachable "$dir/.s.PGSQL.$2" unix && PG_DEFAULT_HOST=$dir && return 0
    done
    reachable 127.0.0.1 "$2" && PG_DEFAULT_HOST=127.0.0.1
  elif [[ $2 != unix ]]; then
    timeout 1 bash -c "exec 3<>'/dev/tcp/$1/$2'" 2>/dev/null
  elif command -v "$SOCKET_PY" >/dev/null; then
    timeout 3 "$SOCKET_PY" -c \
      'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$1" 2>/dev/null
  else
    [[ -S $1 ]] # no Python: a socket file at least (it may be a stale one)
  fi
}

wait_for() { # host port seconds
  local deadline=$((SECONDS + $3))
  until reachable "$1" "$2"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# Installing and starting system servers needs root; use passwordless sudo if we are not.
as_root() {
  if ((EUID == 0)); then
    "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo -n "$@"
  else
    echo "needs root (or passwordless sudo) to run: $*" >>"$LOG"
    return 1
  fi
}

apt_updated=
apt_install() {
  command -v apt-get >/dev/null || return 1
  say "installing $* (apt-get; output in $LOG)"
  if [[ -z $apt_updated ]]; then
    as_root apt-get update -q >>"$LOG" 2>&1 || return 1
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" \
    >>"$LOG" 2>&1
}

# --- the start commands of this machine ------------------------------------------------

start_rabbitmq() {
  # The wrapper drops to the rabbitmq user itself; it fails harmlessly if a node is
  # already booting, so its status is ignored and the port decides.
  as_root rabbitmq-server -detached >>"$LOG" 2>&1 || true
}

start_redis() {
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log >>"$LOG" 2>&1
}

pg_version() { # the newest cluster version configured (or installed) on this machine
  local dir=/etc/postgresql
  [[ -n $(ls -A "$dir" 2>/dev/null) ]] || dir=/usr/lib/postgresql
  find "$dir" -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1
}

start_postgres() {
  local version
  version=$(pg_version)
  [[ -n $version ]] || return 1
  [[ -d /etc/postgresql/$version/main ]] || as_root pg_createcluster "$version" main >>"$LOG" 2>&1
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >>"$LOG" 2>&1
}

# A fresh Debian cluster asks for a password over TCP; the contract's default URL has none.
# Only for a cluster we installed ourselves: let role postgres in from loopback (dev only).
trust_local_postgres() {
  local version hba marker="# added by longhaul scripts/ensure-services.sh (dev machine)"
  version=$(pg_version)
  hba="/etc/postgresql/$version/main/pg_hba.conf"
  [[ -f $hba ]] || return 0
  grep -qF "$marker" "$hba" && return 0
  # First matching line wins in pg_hba.conf, so these go on top.
  as_root sed -i "1i $marker\nhost all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust" "$hba"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload >>"$LOG" 2>&1 || true
}

# --- one server ------------------------------------------------------------------------

problems=()

# Is the server (not just a client) installed?
have_rabbitmq() { [[ -x /usr/sbin/rabbitmq-server ]] || command -v rabbitmq-server >/dev/null; }
have_redis() { command -v redis-server >/dev/null; }
have_postgres() { compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null && command -v pg_ctlcluster >/dev/null; }

# ensure NAME URL DEFAULT_PORT INSTALLED_CHECK PACKAGE START_FUNCTION WAIT_SECONDS
ensure() {
  local name=$1 url=$2 installed=$4 package=$5 start=$6 seconds=$7 host port at fresh=
  read -r port host < <(address "$url" "$3") || { problems+=("$name (bad URL $url)"); return; }
  reachable "$host" "$port" && return 0
  at="$host:$port"
  [[ $host != default ]] || at="127.0.0.1:$port or a socket in ${PG_SOCKET_DIRS[*]}"
  if [[ $port == unix ]]; then
    at="the Unix socket $host"
    # The start commands below serve TCP; of the sockets, only a Debian cluster's
    # default one comes up with them.
    if [[ $name != PostgreSQL || ! $host =~ ^(/var)?/run/postgresql/\.s\.PGSQL\.$3$ ]]; then
      problems+=("$name (nothing listens on $at; only the default address is started here)")
      return
    fi
  else
    if ! is_local "$host"; then
      problems+=("$name ($at is not reachable; it is not on this machine, start it there)")
      return
    fi
    # The start commands below serve the default port on loopback; anything else is a
    # configuration this script cannot fix by starting a server.
    if [[ $port != "$3" ]]; then
      problems+=("$name (nothing listens on $at; only the default port $3 is started here)")
      return
    fi
    if reachable 127.0.0.1 "$port"; then
      problems+=("$name (a server listens on 127.0.0.1:$port but not on $at)")
      return
    fi
  fi
  if ! "$installed"; then
    if ! apt_install "$package"; then
      problems+=("$name (not installed, and 'apt-get install $package' failed; see $LOG)")
      return
    fi
    fresh=1
  fi
  if [[ -n $fresh && $name == PostgreSQL ]]; then trust_local_postgres || true; fi
  reachable "$host" "$port" && return 0   # package scripts may have started it (systemd)
  say "starting $name"
  if ! "$start" || ! wait_for "$host" "$port" "$seconds"; then
    problems+=("$name (installed but not listening on $at after starting it; see $LOG)")
  fi
}

# Reachable is not enough for PostgreSQL: the default URL logs in as postgres, no password.
check_pg_login() {
  command -v psql >/dev/null || return 0
  local admin="${DATABASE_URL%%\?*}" out
  # The run's database may not exist yet (migrate creates it): log in to postgres. A URL
  # with no database path (postgresql://user@host:5432) gets one; a path is replaced.
  local rest="${admin#*://}"
  if [[ $rest == */* ]]; then admin="${admin%/*}/postgres"; else admin="$admin/postgres"; fi
  # Of the query, only where the server is: the other options may be asyncpg's own.
  local where
  where=$(query_pairs "$DATABASE_URL" host port)
  if [[ -n $PG_DEFAULT_HOST ]]; then
    where="${where:+$where&}host=$PG_DEFAULT_HOST"
  fi
  [[ -z $where ]] || admin="$admin?$where"
  if ! out=$(PGCONNECT_TIMEOUT=3 psql "$admin" -XAtqc 'select 1' 2>&1); then
    problems+=("PostgreSQL (reachable but refuses the login of $DATABASE_VAR: ${out%%$'\n'*})")
  fi
}

# RabbitMQ boots slowest (10-20 s, more on a busy machine), hence its longer wait.
ensure RabbitMQ "$AMQP_URL" 5672 have_rabbitmq rabbitmq-server start_rabbitmq 90
ensure Redis "$REDIS_URL" 6379 have_redis redis-server start_redis 15
pg_problems=${#problems[@]}
ensure PostgreSQL "$DATABASE_URL" 5432 have_postgres postgresql start_postgres 30
((${#problems[@]} > pg_problems)) || check_pg_login

if ((${#problems[@]})); then
  # One line, whatever went wrong: this is what a developer (or CI) reads first.
  joined=$(printf '%s; ' "${problems[@]}")
  echo "ensure-services: missing: ${joined%; }" >&2
  exit 1
fi
say "RabbitMQ, Redis and PostgreSQL are reachable"
