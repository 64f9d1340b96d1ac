#!/usr/bin/env bash
# testbed.sh - two throw-away single-node Ceph (Pacific) clusters on loopback,
# "site a" and "site b", for Cairn's cross-site replication tests.
#
#   testbed.sh start  DIR [--base-port N] [--store-mib M]
#   testbed.sh stop   DIR [--purge]
#   testbed.sh status DIR
#   testbed.sh check  DIR
#   testbed.sh user   DIR SITE NAME
#
# Each site is one mon, one mgr and one memstore OSD with cephx on. Nothing is
# installed system-wide and nothing under /etc/ceph or /var is used: every
# path lives under DIR, so several testbeds can run side by side as long as
# their base ports are at least 300 apart (a testbed uses N .. N+299).
# See README.md beside this file for the layout and the reasons behind the
# settings.
set -euo pipefail
# Daemons and CLIs all read CEPH_ARGS; a caller's (say --id alice) must not
# leak into the cluster's own commands. Everything here passes -c explicitly.
unset CEPH_ARGS

readonly PROG=${0##*/}
readonly SITES=(a b)
readonly DEFAULT_BASE_PORT=16789
readonly DEFAULT_STORE_MIB=3072
# How long one wait (quorum, OSD up, mgr, pool) may take before start gives up.
readonly WAIT_TIMEOUT=${TESTBED_WAIT_TIMEOUT:-60}
# How long a single ceph/rbd CLI call may take: a CLI talking to a cluster
# whose PGs are not active blocks forever, and a test bed must never hang.
readonly CMD_TIMEOUT=${TESTBED_CMD_TIMEOUT:-30}
# How long stop waits after SIGTERM before it sends SIGKILL.
readonly STOP_TIMEOUT=${TESTBED_STOP_TIMEOUT:-20}
# The ceph CLI is Debian's python script; parse its JSON with the same
# interpreter rather than whatever python3 comes first on PATH (pyenv etc.).
readonly PY=/usr/bin/python3
# ceph-mon refuses to start, and a running one shuts down, when the file
# system of its store has this share free or less (whole percent; "mon data
# avail crit" in write_conf). start checks it first, and warns below
# FREE_WARN_PCT: a busy CI disk fills as the tests write.
readonly MON_AVAIL_CRIT_PCT=1
readonly FREE_WARN_PCT=5
# Marks a site directory as made by this script, so start may recreate it and
# stop --purge may delete it without risking somebody else's directory.
readonly MARKER=.cairn-testbed
# mgr modules never loaded (see write_conf). The always-on ones (balancer,
# crash, devicehealth, orchestrator, pg_autoscaler, progress, rbd_support,
# status, telemetry, volumes) must stay: the mon reports HEALTH_ERR
# MGR_MODULE_ERROR for an always-on module the mgr did not load.
readonly DISABLED_MODULES="alerts cephadm dashboard diskprediction_local influx insights iostat k8sevents localpool mds_autoscaler mirroring nfs osd_perf_query osd_support prometheus restful rook selftest snap_schedule stats telegraf test_orchestrator zabbix"

usage() {
  cat >&2 <<EOF
usage: $PROG start  DIR [--base-port N] [--store-mib M]
       $PROG stop   DIR [--purge]
       $PROG status DIR
       $PROG check  DIR
       $PROG user   DIR SITE NAME
EOF
  exit 2
}

die() {
  echo "$PROG: error: $*" >&2
  exit 1
}

# Log lines are prefixed with the site, because both sites start at once.
say() {
  echo "[site ${SITE:-?}] $*"
}

now_ms() {
  date +%s%3N
}

abs_dir() {
  # DIR may not exist yet; realpath -m resolves it anyway. Daemons get absolute
  # paths because they chdir("/") and the conf is read from anywhere.
  realpath -m -- "$1"
}

site_dir() { # DIR SITE
  echo "$1/$2"
}

# ceph/rbd CLI against one site, bounded in time (see CMD_TIMEOUT).
c_ceph() { # CONF ARGS...
  local conf=$1
  shift
  timeout "$CMD_TIMEOUT" ceph --connect-timeout 10 -c "$conf" "$@"
}

c_rbd() { # CONF ARGS...
  local conf=$1
  shift
  timeout "$CMD_TIMEOUT" rbd -c "$conf" "$@"
}

json_get() { # PYTHON-EXPR-ON-d  (reads JSON on stdin)
  "$PY" -c 'import json,sys; d=json.load(sys.stdin); print('"$1"')'
}

# --- processes ----------------------------------------------------------------

# True when PID is alive, not a zombie, and was started with this site's conf.
# The conf check is what makes stop safe: a PID recorded long ago may have
# been reused by an unrelated process (or another testbed's daemon).
pid_is_ours() { # PID CONF
  local pid=$1 conf=$2 stat state args=()
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  # Builtins only (read, mapfile): start polls this several times a second.
  read -r stat 2>/dev/null <"/proc/$pid/stat" || return 1
  # The state follows the command name, which is in parentheses and may
  # contain spaces: take the word after the last ") ".
  state=${stat##*) }
  state=${state%% *}
  [[ $state != Z && $state != X ]] || return 1
  mapfile -d '' -t args 2>/dev/null <"/proc/$pid/cmdline" || return 1
  [[ " ${args[*]} " == *" -c $conf "* ]]
}

# The PID recorded in a pid file (empty if none).
read_pid() { # PIDFILE
  local pid=''
  [[ -r $1 ]] && read -r pid <"$1"
  echo "$pid"
}

# Start a daemon in the foreground (-f) in its own session, so it survives the
# caller's terminal/process group. It must not inherit any of the caller's
# descriptors either: a daemon holding a pipe open makes a test doing
# out=$(testbed.sh start ...) or "testbed.sh start | tee" wait until the
# daemon exits. So stdio goes to files and every other descriptor (our fd 3,
# whatever the test harness had open) is closed before exec.
# $! is the daemon's own PID: the subshell execs setsid, and util-linux
# setsid only forks when the caller leads its process group, which a
# background job of a non-interactive shell never does. spawn checks it
# anyway, by waiting for the PID to become the daemon.
spawn() { # SITEDIR NAME CMD...
  local sd=$1 name=$2 pid comm='' i
  shift 2
  (
    for i in "/proc/$BASHPID/fd/"*; do
      i=${i##*/}
      if ((i > 2)); then eval "exec $i>&-"; fi
    done
    exec setsid "$@" </dev/null >>"$sd/log/$name.out" 2>&1
  ) &
  pid=$!
  echo "$pid" >"$sd/run/$name.pid"
  # The exec takes milliseconds; up to 30 s are allowed on a loaded VM. A
  # daemon that exits at once (no disk space, a bad option) ends the wait.
  for ((i = 0; i < 600; i++)); do
    comm=''
    read -r comm 2>/dev/null <"/proc/$pid/comm" || break
    [[ $comm == "${1##*/}" ]] && break
    sleep 0.05
  done
  if [[ $comm != "${1##*/}" ]] || ! pid_is_ours "$pid" "$sd/ceph.conf"; then
    local state='' wchan=''
    state=$(grep -m1 '^State:' "/proc/$pid/status" 2>/dev/null) || true
    read -r wchan 2>/dev/null <"/proc/$pid/wchan" || true
    if [[ -z $comm ]]; then
      fail "$name" "$name exited before it started (PID $pid; its log and output follow)"
    elif [[ $comm == "${1##*/}" ]]; then
      fail "$name" "$name exited right after it started (PID $pid; its log and output follow)"
    else
      fail "$name" "$name did not start (PID $pid is '$comm', not $1${state:+; $state}${wchan:+, waiting in $wchan})"
    fi
  fi
}

# Print the end of a daemon's log and its captured stdout/stderr, which is
# where errors before the log file is opened (bad conf, bind failure) go.
show_logs() { # SITEDIR NAME
  local sd=$1 name=$2 f
  for f in "$sd/log/$name.log" "$sd/log/$name.out"; do
    [[ -s $f ]] || continue
    echo "----- last 25 lines of $f -----" >&3
    grep -v '^$' "$f" | tail -n 25 >&3
  done
}

# Abort the start of the current site with a message and the relevant log.
# Runs inside the site's subshell; the parent stops whatever was started.
# Writes to fd 3, the start's stderr, because fail may be called where
# stderr is redirected to a file.
fail() { # DAEMON-NAME-OR-EMPTY MESSAGE
  echo "[site ${SITE:-?}] FAILED: $2" >&3
  [[ -n $1 ]] && show_logs "$SD" "$1"
  exit 1
}

# Name of the first daemon of the site that was started but is not running.
dead_daemon() {
  local f pid
  for f in "$SD"/run/*.pid; do
    [[ -e $f ]] || continue
    read -r pid <"$f" || true
    if ! pid_is_ours "$pid" "$SD/ceph.conf"; then
      f=${f##*/}
      echo "${f%.pid}"
      return 0
    fi
  done
  return 1
}

# Kill PID and its descendants (by PID, children found through ps --ppid).
kill_tree() { # PID
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
    kill_tree "$child"
  done
  kill "$1" 2>/dev/null || true
}

# Run CMD (a command or one of our functions) and return its status, while
# watching the site: if one of its daemons dies or the other site failed, CMD
# is killed and the site fails at once. Without this a client waiting for a
# dead OSD (rbd pool init, rbd ls) only gives up after CMD_TIMEOUT.
watched() { # CMD...
  "$@" &
  local pid=$! dead
  while kill -0 "$pid" 2>/dev/null; do
    if dead=$(dead_daemon) || [[ -e $ABORT_FLAG ]]; then
      kill_tree "$pid"
      wait "$pid" 2>/dev/null || true
      [[ -n $dead ]] && fail "$dead" "$dead (PID $(read_pid "$SD/run/$dead.pid")) exited"
      fail "" "aborted (the other site failed, or start was interrupted)"
    fi
    sleep 0.2
  done
  wait "$pid"
}

# Run CMD quietly (the ceph CLI reports success on stderr); on failure show its
# output and the log of DAEMON, then fail the site.
run_or_fail() { # DAEMON MESSAGE CMD...
  local daemon=$1 msg=$2 out=$SD/log/testbed-step.out
  shift 2
  if ! watched "$@" >"$out" 2>&1; then
    echo "[site ${SITE:-?}] $*:" >&3
    cat "$out" >&3
    fail "$daemon" "$msg"
  fi
}

# Poll CMD until it succeeds, with a deadline, failing fast if a daemon of
# the site died or the other site's start already failed.
wait_until() { # WHAT DAEMON-FOR-LOGS CMD...
  local what=$1 daemon=$2 deadline
  shift 2
  deadline=$((SECONDS + WAIT_TIMEOUT))
  until watched "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "$daemon" "timed out after ${WAIT_TIMEOUT}s waiting for $what"
    sleep 0.25
  done
}

# --- configuration --------------------------------------------------------------

write_conf() { # SITEDIR MONPORT PORTMIN PORTMAX STORE_BYTES FSID
  local sd=$1 monport=$2 pmin=$3 pmax=$4 bytes=$5 fsid=$6
  cat >"$sd/ceph.conf" <<EOF
# Written by tests/cluster/testbed.sh; see tests/cluster/README.md.
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$monport
# Loopback only, IPv4 only; the OSD and mgr take ports from a range of their
# own so several clusters on one machine never collide.
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
ms bind port min = $pmin
ms bind port max = $pmax

auth cluster required = cephx
auth service required = cephx
auth client required = cephx
# Every client here is Pacific; this silences AUTH_INSECURE_GLOBAL_ID_RECLAIM*.
auth allow insecure global id reclaim = false

# Everything under this directory: nothing in /var/run/ceph, /var/log/ceph.
run dir = $sd/run
crash dir = $sd/crash
log file = $sd/log/\$name.log
admin socket = $sd/run/\$name.asok
# The script records PIDs itself (run/<daemon>.pid); daemons run with -f.
pid file =
mon data = $sd/mon.\$id
osd data = $sd/osd.\$id
mgr data = $sd/mgr.\$id

# One OSD: replicas of one, CRUSH picks OSDs rather than hosts.
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon allow pool delete = true
# The mon store lives on whatever disk DIR is on; a busy CI disk must not
# turn the cluster unhealthy or make the mon shut itself down.
mon data avail warn = $((MON_AVAIL_CRIT_PCT + 1))
mon data avail crit = $MON_AVAIL_CRIT_PCT
mon clock drift allowed = 10
# The mon batches map changes for up to a second by default; every step of
# the start (OSD boot, crush placement, pool create, ...) waits for one.
paxos propose interval = 0.05
# PG and usage statistics flow OSD -> mgr -> mon every 5 s by default; with
# one OSD it costs nothing to do it every second, and a filling OSD is then
# noticed (health OSD_NEARFULL, testbed.sh check) within a couple of seconds.
mgr stats period = 1
mon mgr digest period = 1
# The OSD re-evaluates its own full state on each heartbeat tick (6 s by
# default). A lone OSD has no peers to ping, so ticking every second is free.
osd heartbeat interval = 1

osd objectstore = memstore
memstore device bytes = $bytes
# Short PG logs. Ceph 16 sizes them from a target of 300000 entries per
# OSD; on this lone OSD that is ~9000 per PG, each entry (and its dup) kept
# in memstore's omap in RAM. Filling them took the OSD from 275 to 120 MiB/s
# of 64 KiB writes over six minutes of writing (RSS 8 GiB, 100 MiB stored),
# so the bench measured a test bed that slowed down as it ran. With one OSD
# there is no peer to recover from a log; a few hundred entries per PG
# still catch a client's resent op.
osd target pg log entries per osd = 5000
osd min pg log entries = 100
osd max pg log entries = 500
osd pg log dups tracked = 500
osd memory target = 1073741824
# MemStore does not override is_rotational(), so the OSD takes the *_hdd
# values: 5 s of sleep between snapshot trims, 5 s between PG deletions and
# 0.1 s between recovery ops. A zero in the generic option means "use the
# device-specific one", so every variant is zeroed.
osd snap trim sleep = 0
osd snap trim sleep hdd = 0
osd snap trim sleep ssd = 0
osd snap trim sleep hybrid = 0
osd delete sleep = 0
osd delete sleep hdd = 0
osd delete sleep ssd = 0
osd delete sleep hybrid = 0
osd recovery sleep = 0
osd recovery sleep hdd = 0
osd recovery sleep ssd = 0
osd recovery sleep hybrid = 0
# One PG trims snapshots at a time (default 2). Ceph 16's MemStore omap
# iterator keeps a std::map iterator between calls; the snap mapper is one
# object shared by every PG, so a PG reading its next clone to trim can land
# on a key another trimming PG erases at that moment, and the OSD segfaults
# in MemStore::OmapIteratorImpl::value under SnapMapper::get_next_objects_to_trim.
# Removing many snapshots at once (retention after an outage) hit it.
osd max trimming pgs = 1

rbd default features = layering,exclusive-lock,object-map,fast-diff,deep-flatten

[mon]
# No restful/iostat/nfs: nothing listens on HTTP ports, the mgr starts faster.
mgr initial modules =

[mgr]
# The mgr imports every module it finds, enabled or not; on a small machine
# that python start-up costs seconds of CPU. The dashboard is not even
# installed, and none of these is needed by rbd.
mgr disabled modules = $DISABLED_MODULES

[client]
keyring = $sd/ceph.client.admin.keyring
# One socket per client process, or concurrent clients would fight over it.
admin socket = $sd/run/\$name.\$pid.asok
EOF
}

# --- start -----------------------------------------------------------------------

# Bring up one site. Runs in a background subshell; exits non-zero on failure
# after printing what went wrong and the relevant log.
site_up() { # DIR SITE MONPORT PORTMIN PORTMAX STORE_BYTES
  local dir=$1 monport=$3 pmin=$4 pmax=$5 bytes=$6
  SITE=$2
  SD=$(site_dir "$dir" "$SITE")
  local conf=$SD/ceph.conf fsid osd_uuid osd_id t0
  t0=$(now_ms)
  exec 3>&2 # see fail
  # Anything failing that is not checked explicitly still gets a message.
  set -E
  trap 'fail "" "unexpected failure (line $LINENO): $BASH_COMMAND"' ERR

  mkdir -p "$SD"/{log,run,crash,mon.a,osd.0,mgr.x}
  touch "$SD/$MARKER"
  fsid=$(uuidgen)
  write_conf "$SD" "$monport" "$pmin" "$pmax" "$bytes" "$fsid"

  # Keys first: mon. for the mon itself and client.admin for this script and
  # the tests. The mon's mkfs keyring holds both so admin exists from boot.
  ceph-authtool "$SD/ceph.client.admin.keyring" --create-keyring --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$SD/mon.keyring" --create-keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$SD/mon.keyring" --import-keyring "$SD/ceph.client.admin.keyring" >/dev/null
  chmod 600 "$SD"/*.keyring

  # Monitor: a monmap with only a v2 address, mkfs, then run it.
  monmaptool --create --enable-all-features --set-min-mon-release 16 --fsid "$fsid" --addv a "[v2:127.0.0.1:$monport]" "$SD/monmap" \
    >"$SD/log/monmaptool.out" 2>&1 || fail monmaptool "monmaptool failed"
  ceph-mon -c "$conf" --mkfs -i a --monmap "$SD/monmap" --keyring "$SD/mon.keyring" \
    >"$SD/log/mon.a.out" 2>&1 || fail mon.a "ceph-mon --mkfs failed"
  spawn "$SD" mon.a ceph-mon -f -c "$conf" -i a
  wait_until "mon quorum on 127.0.0.1:$monport" mon.a c_ceph "$conf" quorum_status
  say "mon up on v2:127.0.0.1:$monport ($(($(now_ms) - t0)) ms)"

  # Before the mgr loads its modules: devicehealth would otherwise create a
  # pool of its own (device_health_metrics) as soon as the OSD is up. --force
  # because the mon only learns module options from a running mgr.
  run_or_fail mon.a "ceph config set failed" \
    c_ceph "$conf" config set mgr mgr/devicehealth/enable_monitoring false --force

  # Manager: its own key, its own keyring (see README: no global keyring).
  # Started before the OSD because loading its python modules is the slow part.
  run_or_fail mon.a "creating the mgr.x key failed" \
    c_ceph "$conf" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$SD/mgr.x/keyring"
  spawn "$SD" mgr.x ceph-mgr -f -c "$conf" -i x --keyring "$SD/mgr.x/keyring"

  # OSD: key, registration with the mon, mkfs and run, all with its keyring.
  osd_uuid=$(uuidgen)
  ceph-authtool "$SD/osd.0/keyring" --create-keyring --gen-key -n osd.0 >/dev/null
  run_or_fail mon.a "ceph auth add osd.0 failed" \
    c_ceph "$conf" auth add osd.0 osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
    -i "$SD/osd.0/keyring"
  run_or_fail mon.a "ceph osd new failed" c_ceph "$conf" osd new "$osd_uuid" 0
  osd_id=$(<"$SD/log/testbed-step.out")
  [[ $osd_id == 0 ]] || fail mon.a "ceph osd new returned '$osd_id', expected the id 0"
  # mkfs talks to the mon (it fetches the config), so it is bounded in time too.
  watched timeout "$CMD_TIMEOUT" ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" \
    --keyring "$SD/osd.0/keyring" >"$SD/log/osd.0.out" 2>&1 || fail osd.0 "ceph-osd --mkfs failed"
  spawn "$SD" osd.0 ceph-osd -f -c "$conf" -i 0 --keyring "$SD/osd.0/keyring"

  wait_until "1 OSD up and in" osd.0 osd_up_in "$conf"
  say "osd.0 up and in ($(($(now_ms) - t0)) ms)"

  # The rbd pool: fixed pg_num, size 1, tagged for rbd, initialised.
  run_or_fail mon.a "ceph osd pool create rbd failed" \
    c_ceph "$conf" osd pool create rbd 32 32 replicated --size 1 --autoscale-mode off
  run_or_fail mon.a "ceph osd pool application enable rbd rbd failed" \
    c_ceph "$conf" osd pool application enable rbd rbd
  run_or_fail osd.0 "rbd pool init rbd failed" c_rbd "$conf" pool init rbd
  wait_until "pool rbd usable (rbd ls)" osd.0 c_rbd "$conf" ls rbd
  # Ballast: after many image create/delete cycles memstore's used-bytes
  # counter can go below zero, the OSD then reports itself full (16 EiB
  # used) and every write hangs. One object that is never deleted keeps
  # the counter positive (root cause in memstore not found).
  run_or_fail mon.a "ceph osd pool create ballast failed" \
    c_ceph "$conf" osd pool create ballast 1 1 replicated --size 1 --autoscale-mode off
  run_or_fail mon.a "ceph osd pool application enable ballast failed" \
    c_ceph "$conf" osd pool application enable ballast testbed
  head -c 96M /dev/zero >"$SD/ballast.bin"
  run_or_fail osd.0 "writing the ballast object failed" \
    timeout "$CMD_TIMEOUT" rados -c "$conf" -p ballast put ballast "$SD/ballast.bin"
  rm -f "$SD/ballast.bin"

  wait_until "mgr available" mgr.x mgr_available "$conf"
  # rbd ls proves the PGs work; this makes the mgr's view (ceph -s, ceph df,
  # the fullness checks) agree before the tests start looking at it.
  wait_until "mgr to report all PGs active+clean" mgr.x pgs_clean "$conf"
  say "mgr available, pool rbd ready ($(($(now_ms) - t0)) ms)"
}

# The start's polls match the CLI's compact output with bash regexes rather
# than start a python per poll: on a busy 2-CPU machine every process counts.
osd_up_in() { # CONF
  local out
  out=$(c_ceph "$1" osd stat -f json) || return 1
  [[ $out =~ \"num_up_osds\":1, && $out =~ \"num_in_osds\":1, ]]
}

mgr_available() { # CONF
  local out
  out=$(c_ceph "$1" mgr stat -f json) || return 1
  [[ $out =~ \"available\":true ]]
}

# "32 pgs: 32 active+clean; ..." - every PG in the one state active+clean.
pgs_clean() { # CONF
  local out
  out=$(c_ceph "$1" pg stat) || return 1
  [[ $out =~ ^([1-9][0-9]*)\ pgs:\ ([0-9]+)\ active\+clean\; ]] &&
    [[ ${BASH_REMATCH[1]} == "${BASH_REMATCH[2]}" ]]
}

# Is TCP PORT on 127.0.0.1 (or any address) already listened on?
port_busy() { # PORT
  [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]
}

any_daemon_alive() { # DIR
  local s sd f
  for s in "${SITES[@]}"; do
    sd=$(site_dir "$1" "$s")
    for f in "$sd"/run/*.pid; do
      [[ -e $f ]] || continue
      pid_is_ours "$(read_pid "$f")" "$sd/ceph.conf" && return 0
    done
  done
  return 1
}

start_interrupted() { # DIR PID-A PID-B
  echo "$PROG: interrupted; stopping the daemons that were started" >&2
  touch "$ABORT_FLAG" || true
  wait "$2" "$3" 2>/dev/null || true
  stop_dir "$1" >&2 || true
  rm -f "$ABORT_FLAG"
  exit 130
}

cmd_start() {
  (($# >= 1)) || usage
  local dir base=$DEFAULT_BASE_PORT mib=$DEFAULT_STORE_MIB
  dir=$(abs_dir "$1")
  shift
  while (($#)); do
    case $1 in
      --base-port) (($# >= 2)) || usage; base=$2; shift 2 ;;
      --store-mib) (($# >= 2)) || usage; mib=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  if ! [[ $base =~ ^[0-9]+$ ]] || ((base < 1024 || base + 299 > 65535)); then
    die "--base-port must be a number in 1024..65236 (the testbed uses N..N+299)"
  fi
  if ! [[ $mib =~ ^[0-9]+$ ]] || ((mib < 64)); then
    die "--store-mib must be a number >= 64"
  fi
  # Unix socket paths are limited to 107 bytes; a client socket is
  # DIR/a/run/client.NAME.PID.asok. Refuse rather than lose admin sockets.
  ((${#dir} <= 60)) || die "DIR path '$dir' is too long (max 60 chars) for admin sockets"
  local cmd
  for cmd in ceph ceph-mon ceph-osd ceph-mgr ceph-authtool monmaptool rbd uuidgen setsid ss timeout; do
    command -v "$cmd" >/dev/null || die "'$cmd' not found (run deps.sh)"
  done
  [[ -x $PY ]] || die "$PY not found"

  any_daemon_alive "$dir" && die "a testbed is already running in $dir (run: $PROG stop $dir)"
  local s sd
  for s in "${SITES[@]}"; do
    sd=$(site_dir "$dir" "$s")
    if [[ -e $sd ]]; then
      # A stopped testbed of ours is recreated; anything else is left alone.
      [[ -e $sd/$MARKER ]] || die "$sd exists and was not made by $PROG; refusing to touch it"
      rm -rf -- "$sd"
    fi
  done
  # The mon ports are fixed; the OSD/mgr ports are picked by Ceph within the
  # range, so only the mons need checking here.
  local p
  for p in "$base" "$((base + 1))"; do
    port_busy "$p" && die "port $p is already in use; pick another --base-port"
  done

  mkdir -p "$dir"
  # ceph-mon would refuse to start (MON_AVAIL_CRIT_PCT): say so up front.
  local free_pct
  free_pct=$(df -Pk -- "$dir" | awk 'NR == 2 { printf "%d", ($2 > 0 ? $4 * 100 / $2 : 100) }')
  if ((free_pct <= MON_AVAIL_CRIT_PCT)); then
    die "the file system of $dir has ${free_pct} % free; ceph-mon refuses to start with" \
      "${MON_AVAIL_CRIT_PCT} % or less (mon data avail crit): free some space"
  elif ((free_pct < FREE_WARN_PCT)); then
    echo "$PROG: warning: the file system of $dir has only ${free_pct} % free; ceph-mon" \
      "shuts down at ${MON_AVAIL_CRIT_PCT} %" >&2
  fi
  rm -f "$dir/env"
  ABORT_FLAG=$dir/.start-aborted
  rm -f "$ABORT_FLAG"
  local t0 pa pb rc=0
  t0=$(now_ms)
  echo "$PROG: starting testbed in $dir (base port $base, memstore ${mib} MiB per OSD)"

  # Both sites at once: they share nothing, and this halves the start time.
  site_up "$dir" a "$base" "$((base + 100))" "$((base + 199))" "$((mib * 1024 * 1024))" &
  pa=$!
  site_up "$dir" b "$((base + 1))" "$((base + 200))" "$((base + 299))" "$((mib * 1024 * 1024))" &
  pb=$!
  # On Ctrl-C or kill: tell the sites to give up, let them exit, clean up.
  # (set -e is live in a trap too: every step must tolerate failure.)
  trap 'start_interrupted "$dir" "$pa" "$pb"' INT TERM

  # As soon as one site fails, tell the other to stop waiting.
  local first
  wait -n -p first "$pa" "$pb" || { rc=1; touch "$ABORT_FLAG"; }
  if [[ $first == "$pa" ]]; then wait "$pb" || rc=1; else wait "$pa" || rc=1; fi
  trap - INT TERM
  rm -f "$ABORT_FLAG"

  if ((rc != 0)); then
    echo "$PROG: start failed; stopping the daemons that were started" >&2
    stop_dir "$dir" >&2
    exit 1
  fi

  # cairnd's own least-privilege user at each site (never client.admin).
  local s
  for s in a b; do
    cmd_user "$dir" "$s" cairn >/dev/null || { stop_dir "$dir" >&2; exit 1; }
  done

  {
    echo "# Written by $PROG start; source it (set -a to export)."
    printf 'CEPH_CONF_A=%q\n' "$dir/a/ceph.conf"
    printf 'CEPH_CONF_B=%q\n' "$dir/b/ceph.conf"
    printf 'CEPH_KEYRING_A=%q\n' "$dir/a/ceph.client.admin.keyring"
    printf 'CEPH_KEYRING_B=%q\n' "$dir/b/ceph.client.admin.keyring"
    printf 'CAIRN_KEYRING_A=%q\n' "$dir/a/ceph.client.cairn.keyring"
    printf 'CAIRN_KEYRING_B=%q\n' "$dir/b/ceph.client.cairn.keyring"
    printf 'CEPH_MON_A=%q\n' "v2:127.0.0.1:$base"
    printf 'CEPH_MON_B=%q\n' "v2:127.0.0.1:$((base + 1))"
  } >"$dir/env"
  echo "$PROG: testbed up in $(($(now_ms) - t0)) ms"
  echo "site a: $dir/a/ceph.conf"
  echo "site b: $dir/b/ceph.conf"
  echo "env: $dir/env"
}

# --- stop ------------------------------------------------------------------------

# Send SIG to the recorded daemons matching GLOB of both sites and wait until
# they are gone or DEADLINE (in $SECONDS) passes. Prints the PIDs still alive.
signal_and_wait() { # DIR SIG DEADLINE GLOB...
  local dir=$1 sig=$2 deadline=$3
  shift 3
  local s sd f pid glob pids=() confs=() i left
  for s in "${SITES[@]}"; do
    sd=$(site_dir "$dir" "$s")
    for glob in "$@"; do
      for f in "$sd"/run/$glob.pid; do
        [[ -e $f ]] || continue
        pid=$(read_pid "$f")
        if pid_is_ours "$pid" "$sd/ceph.conf"; then
          echo "stopping $s/$(basename "$f" .pid) (PID $pid) with SIG$sig"
          kill "-$sig" "$pid" 2>/dev/null || true
          pids+=("$pid")
          confs+=("$sd/ceph.conf")
        fi
      done
    done
  done
  while :; do
    left=()
    for i in "${!pids[@]}"; do
      pid_is_ours "${pids[$i]}" "${confs[$i]}" && left+=("${pids[$i]}")
    done
    ((${#left[@]} == 0)) && return 0
    ((SECONDS < deadline)) || break
    sleep 0.1
  done
  echo "still running after SIG$sig: ${left[*]}"
  return 1
}

stop_dir() { # DIR
  local dir=$1 deadline s f
  deadline=$((SECONDS + STOP_TIMEOUT))
  # OSDs and mgrs first, mons last: an OSD that is shutting down tells its mon
  # and waits for the answer, which never comes if the mon is already gone.
  signal_and_wait "$dir" TERM "$deadline" 'osd.*' 'mgr.*' ||
    signal_and_wait "$dir" KILL $((SECONDS + 5)) 'osd.*' 'mgr.*' || true
  signal_and_wait "$dir" TERM "$((SECONDS + STOP_TIMEOUT))" 'mon.*' ||
    signal_and_wait "$dir" KILL $((SECONDS + 5)) 'mon.*' || true
  local alive=0
  for s in "${SITES[@]}"; do
    local sd
    sd=$(site_dir "$dir" "$s")
    for f in "$sd"/run/*.pid; do
      [[ -e $f ]] || continue
      if pid_is_ours "$(read_pid "$f")" "$sd/ceph.conf"; then
        alive=1
        echo "$PROG: could not stop $s/$(basename "$f" .pid) (PID $(read_pid "$f"))" >&2
      else
        # A killed daemon leaves its admin socket behind.
        rm -f -- "$f" "${f%.pid}.asok"
      fi
    done
  done
  return "$alive"
}

cmd_stop() {
  (($# >= 1)) || usage
  local dir purge=0
  dir=$(abs_dir "$1")
  shift
  while (($#)); do
    case $1 in
      --purge) purge=1; shift ;;
      *) usage ;;
    esac
  done
  if [[ ! -d $dir ]]; then
    echo "$PROG: $dir does not exist; nothing to stop"
    return 0
  fi
  stop_dir "$dir" || die "some daemons could not be stopped; not purging"
  echo "$PROG: stopped $dir"
  if ((purge)); then
    # Only delete what is recognisably a testbed of ours.
    if [[ -e $dir/a/$MARKER || -e $dir/b/$MARKER ]]; then
      rm -rf -- "$dir"
      echo "$PROG: removed $dir"
    else
      die "$dir does not look like a testbed; not removing it"
    fi
  fi
}

# --- status / check / user --------------------------------------------------------

# True when the site's mon, recorded in run/mon.a.pid, is running: without it
# every ceph command would only give up after its connect timeout.
mon_running() { # DIR SITE
  local sd
  sd=$(site_dir "$1" "$2")
  pid_is_ours "$(read_pid "$sd/run/mon.a.pid")" "$sd/ceph.conf"
}

# Every daemon recorded for the site is running; names the ones that are not.
# A killed lone OSD stays "up" in the OSD map for up to 15 minutes (no peer
# reports it down), so the processes tell more than the cluster does.
site_procs_ok() { # DIR SITE
  local sd f name ok=0
  sd=$(site_dir "$1" "$2")
  for f in "$sd"/run/*.pid; do
    [[ -e $f ]] || continue
    if ! pid_is_ours "$(read_pid "$f")" "$sd/ceph.conf"; then
      name=${f##*/}
      name=${name%.pid}
      echo "site $2: $name is not running (see $sd/log/$name.log)"
      ok=1
    fi
  done
  return "$ok"
}

site_conf() { # DIR SITE
  local conf
  conf=$(site_dir "$1" "$2")/ceph.conf
  [[ -r $conf ]] || die "no testbed site $2 in $1 ($conf missing)"
  echo "$conf"
}

cmd_status() {
  (($# == 1)) || usage
  local dir s conf rc=0 out
  dir=$(abs_dir "$1")
  for s in "${SITES[@]}"; do
    conf=$(site_conf "$dir" "$s")
    echo "=== site $s: $conf"
    if ! mon_running "$dir" "$s"; then
      echo "site $s: not running (no live mon.a recorded under $dir/$s/run)"
      rc=1
      continue
    fi
    site_procs_ok "$dir" "$s" || rc=1
    if ! c_ceph "$conf" -s; then
      echo "site $s: cluster unreachable"
      rc=1
      continue
    fi
    out=$(c_ceph "$conf" osd stat -f json 2>/dev/null) || { rc=1; continue; }
    if [[ $(json_get 'int(d["num_osds"] > 0 and d["num_up_osds"] == d["num_osds"])' <<<"$out") != 1 ]]; then
      echo "site $s: not all OSDs are up"
      rc=1
    fi
  done
  return "$rc"
}

# Prints the OSDs whose usage is at or above the nearfull ratio; false if any.
# Computed from the mgr's per-second statistics, so it catches a filling OSD
# before the mon has raised OSD_NEARFULL/OSD_FULL.
osds_over_nearfull() { # OSD-DF-JSON OSD-DUMP-JSON
  "$PY" -c '
import json, sys
df, dump = json.loads(sys.argv[1]), json.loads(sys.argv[2])
near = dump["nearfull_ratio"] * 100
bad = 0
for n in df["nodes"]:
    if n["kb"] and n["utilization"] >= near:
        print("%s is %.1f%% used (nearfull at %.0f%%, full at %.0f%%), %d KiB free"
              % (n["name"], n["utilization"], near, dump["full_ratio"] * 100, n["kb_avail"]))
        bad = 1
sys.exit(bad)' "$1" "$2"
}

# Fail fast instead of hanging: a full OSD blocks writes forever (the client
# just waits for space), a down OSD blocks all I/O. Exits non-zero with the
# reason; quiet apart from one line when all is well.
cmd_check() {
  (($# == 1)) || usage
  local dir s conf rc=0 health df dump over
  dir=$(abs_dir "$1")
  for s in "${SITES[@]}"; do
    conf=$(site_conf "$dir" "$s")
    if ! mon_running "$dir" "$s"; then
      echo "site $s: not running (no live mon.a recorded under $dir/$s/run)" >&2
      rc=1
      continue
    fi
    site_procs_ok "$dir" "$s" >&2 || rc=1
    if ! health=$(c_ceph "$conf" health detail 2>&1) ||
      ! df=$(c_ceph "$conf" osd df -f json 2>&1) ||
      ! dump=$(c_ceph "$conf" osd dump -f json 2>&1); then
      echo "site $s: cluster unreachable ($conf)" >&2
      rc=1
      continue
    fi
    over=$(osds_over_nearfull "$df" "$dump") || true
    if [[ -n $over ]] || grep -qE 'OSD_(NEAR|BACKFILL)?FULL|POOL_(NEAR)?FULL|OSD_FAILSAFE|failsafe' <<<"$health"; then
      echo "site $s: OSD full or nearly full - the memstore is running out of space (start with a larger --store-mib, or delete images):" >&2
      [[ -n $over ]] && echo "$over" >&2
      echo "$health" >&2
      rc=1
    fi
    if [[ $(json_get 'int(len(d["osds"]) > 0 and all(o["up"] for o in d["osds"]))' <<<"$dump") != 1 ]]; then
      echo "site $s: an OSD is down or missing:" >&2
      echo "$health" >&2
      rc=1
    fi
  done
  ((rc == 0)) && echo "$PROG: both sites ok"
  return "$rc"
}

cmd_user() {
  (($# == 3)) || usage
  local dir site=$2 name=$3 conf keyring
  dir=$(abs_dir "$1")
  [[ $site == a || $site == b ]] || die "SITE must be a or b"
  [[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || die "NAME may only contain letters, digits, '.', '_', '-'"
  conf=$(site_conf "$dir" "$site")
  mon_running "$dir" "$site" || die "site $site of $dir is not running"
  keyring=$(site_dir "$dir" "$site")/ceph.client.$name.keyring
  c_ceph "$conf" auth get-or-create "client.$name" mon 'profile rbd' osd 'profile rbd' \
    -o "$keyring" || die "could not create client.$name on site $site"
  chmod 600 "$keyring"
  echo "$keyring"
}

main() {
  (($# >= 1)) || usage
  local cmd=$1
  shift
  case $cmd in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    check) cmd_check "$@" ;;
    user) cmd_user "$@" ;;
    -h | --help | help) usage ;;
    *) usage ;;
  esac
}

main "$@"
