#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and for trying the sbatch scripts.
#
#   tools/local_slurm.sh install   # Debian packages: slurmctld slurmd slurm-client munge (needs root/sudo)
#   tools/local_slurm.sh start     # munged + slurmctld + slurmd; prints the SLURM_CONF to export
#   tools/local_slurm.sh status    # sinfo / squeue
#   tools/local_slurm.sh stop      # stops the daemons (state and logs stay in the state folder)
#
# Everything lives in $CLIPSCALE_SLURM_DIR (default /tmp/clipscale-slurm): slurm.conf, daemon logs,
# state. Clients find it through SLURM_CONF, so a machine's own /etc/slurm is left alone:
#   export SLURM_CONF=/tmp/clipscale-slurm/slurm.conf
# The settings are the ones measured to work in containers (DESIGN.md): munged as user munge,
# proctrack/linuxproc, task/none (no cgroups), select/cons_tres, and a short credential lifetime so
# a requeued job starts again after seconds rather than the default ~2 minutes.
set -euo pipefail

DIR=${CLIPSCALE_SLURM_DIR:-/tmp/clipscale-slurm}
CONF=$DIR/slurm.conf
NODE=$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)
CPUS=${CLIPSCALE_SLURM_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}  # nproc obeys OMP_NUM_THREADS
CTLD_PORT=${CLIPSCALE_SLURM_PORT:-6817}
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local_slurm: $*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif sudo -n true 2>/dev/null; then sudo "$@"
    else die "needs root to run: $*"
    fi
}

installed() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
              && command -v munged >/dev/null; }

cmd_install() {
    if installed; then echo "local_slurm: slurm and munge already installed"; return; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    installed || die "installing ${PACKAGES[*]} did not provide slurmctld/slurmd/sbatch/munged"
    echo "local_slurm: installed ${PACKAGES[*]}"
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool"
    cat > "$CONF" <<EOF
# written by tools/local_slurm.sh
ClusterName=clipscale-local
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=60
MinJobAge=3600
SchedulerParameters=sched_interval=2
NodeName=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
    as_root mkdir -p /run/munge /var/log/munge /var/lib/munge
    as_root chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [ -s /etc/munge/munge.key ] || as_root runuser -u munge -- mungekey --create
    as_root runuser -u munge -- munged
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

cmd_start() {
    installed || die "slurm is not installed: run 'tools/local_slurm.sh install' (as root)"
    write_conf
    start_munge
    export SLURM_CONF=$CONF
    pgrep -f "slurmctld -f $CONF" >/dev/null || as_root slurmctld -f "$CONF"
    pgrep -f "slurmd -f $CONF" >/dev/null || as_root slurmd -f "$CONF"
    for _ in $(seq 60); do
        if sinfo -h -o "%T" 2>/dev/null | grep -qE "^idle|^mixed|^allocated"; then
            echo "local_slurm: up (node $NODE, $CPUS CPUs); export SLURM_CONF=$CONF"
            return
        fi
        sleep 0.5
    done
    tail -n 5 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
    die "the cluster did not come up (logs in $DIR)"
}

cmd_stop() {
    for daemon in slurmd slurmctld; do
        pkill -f "$daemon -f $CONF" 2>/dev/null || true
    done
    for _ in $(seq 50); do
        pgrep -f "slurm(ctl)?d -f $CONF" >/dev/null || { echo "local_slurm: stopped"; return; }
        sleep 0.2
    done
    pkill -9 -f "slurm(ctl)?d -f $CONF" 2>/dev/null || true
    echo "local_slurm: stopped (killed)"
}

cmd_status() {
    export SLURM_CONF=$CONF
    sinfo && squeue
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac
