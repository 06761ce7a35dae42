#!/usr/bin/env bash
# The test suite on a busy machine (issue 20, item 4): two processes that spin on the CPU
# compete with it for the cores the whole time; then the wall time, and a check that the
# suite left no process behind.
#
#   bash benchmarks/busy_suite.sh [pytest arguments]      # default: -q tests
#
# Every process of the suite carries REPRO_BUSY_SUITE=<tag> in its environment (the tests'
# commands, their workers, and whatever those start, even in sessions of their own). After
# pytest exits, a live process with the tag, or one started since the suite began whose
# command line names this repository's scripts (train.py, run_all_experiments.py, pytest,
# multiprocessing workers, gpu_check) and whose working folder is this repository, is a
# leftover: it is listed, killed, and the exit status is 1. Otherwise pytest's own.
# Python: $PYTHON, else `python` (an active virtual environment's).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
REPO="$(pwd -P)"
TAG="$$.$(date +%s%N)"

# two busy processes, each in a process group of its own, ended however this script ends
BUSY=()
for _ in 1 2; do
    "$PY" -c 'import os; os.setsid()
while True: pass' &
    BUSY+=("$!")
done
end_busy() {
    [ ${#BUSY[@]} -gt 0 ] || return 0
    for pid in "${BUSY[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null; done
    wait "${BUSY[@]}" 2>/dev/null
    BUSY=()
}
trap end_busy EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r UPTIME0 _ < /proc/uptime
echo "busy_suite: $(nproc) core(s), 2 busy processes (pids ${BUSY[*]}), load average $(cut -d' ' -f1-3 /proc/loadavg)"
[ $# -gt 0 ] || set -- -q tests
echo "busy_suite: $PY -m pytest $*"
T0=$EPOCHREALTIME
REPRO_BUSY_SUITE="$TAG" "$PY" -m pytest "$@"
RC=$?
T1=$EPOCHREALTIME
echo "busy_suite: pytest exit status $RC; wall time $(awk -v a="$T0" -v b="$T1" \
    'BEGIN { s = b - a; printf "%.0f s (%d min %02d s)", s, s / 60, s % 60 }'); load average $(cut -d' ' -f1-3 /proc/loadavg)"
end_busy

# leftovers: listed at pytest's exit, then again after up to 60 s (a process may be exiting)
"$PY" - "$TAG" "$REPO" "$UPTIME0" "$$" <<'EOF'
import os, signal, sys, time
tag, repo, uptime0, me = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
entry, tick = f'REPRO_BUSY_SUITE={tag}'.encode(), os.sysconf('SC_CLK_TCK')
names = ('train.py', 'run_all_experiments.py', 'pytest', 'multiprocessing', 'gpu_check', 'analyze_results.py')


def leftovers():
    found = {}
    for pid in (int(n) for n in os.listdir('/proc') if n.isdigit()):
        if pid in (os.getpid(), me):
            continue
        try:
            with open(f'/proc/{pid}/stat') as f:
                stat = f.read()
            fields = stat[stat.rindex(')') + 2:].split()
            if fields[0] in 'ZX':  # dead, waiting to be reaped
                continue
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmd = f.read().replace(b'\0', b' ').decode(errors='replace').strip()
            try:
                with open(f'/proc/{pid}/environ', 'rb') as f:
                    tagged = entry in f.read().split(b'\0')
                cwd = os.readlink(f'/proc/{pid}/cwd')
            except OSError:  # another user's: not ours
                continue
        except (OSError, ValueError):  # ended meanwhile
            continue
        started_since = int(fields[19]) / tick > uptime0
        ours = (cwd == repo or cwd.startswith(repo + os.sep) or repo in cmd) and any(n in cmd for n in names)
        if tagged or (started_since and ours):
            found[pid] = (int(fields[2]), fields[0], cmd[:160])
    return found


def show(found):
    for pid, (pgid, state, cmd) in sorted(found.items()):
        print(f"  pid {pid}  pgid {pgid}  state {state}  {cmd}")


left = leftovers()
print(f"busy_suite: processes of the suite alive at pytest's exit: {len(left)}")
show(left)
end = time.monotonic() + 60
while left and time.monotonic() < end:
    time.sleep(0.5)
    left = leftovers()
if left:
    print(f"busy_suite: LEFT BEHIND (still alive 60 s after pytest's exit; now killed): {len(left)}")
    show(left)
    for pgid in {g for g, _, _ in left.values()} - {os.getpgrp()}:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    sys.exit(1)
print("busy_suite: no process of the suite left behind")
EOF
LEFT=$?
[ "$LEFT" -eq 0 ] || exit 1
exit "$RC"
