#!/bin/sh
#
# ocf:imfleet:controller: `controller serve`, the imfleet daemon, as a
# Pacemaker resource. `controller ha install --apply` writes this file to
# /usr/lib/ocf/resource.d/imfleet/controller on the node it runs on.
#
# start    waits until the daemon answers /readyz on the socket in its
#          state directory (its own, not whatever holds a port); refuses a
#          state directory that holds no imfleet state (the replicated
#          filesystem not mounted here); gives up before Pacemaker's timeout.
# monitor  the process (pid file, checked against the binary), then /readyz;
#          7 (not running) when it is not there.
# stop     SIGTERM, then SIGKILL after the grace period; succeeds whatever
#          the configuration or installation: a failed stop would block the
#          resource or fence the node.

: "${OCF_FUNCTIONS_DIR=${OCF_ROOT:-/usr/lib/ocf}/lib/heartbeat}"
# shellcheck disable=SC1091
. "${OCF_FUNCTIONS_DIR}/ocf-shellfuncs"

: "${OCF_RESKEY_binary:=/usr/local/bin/controller}"
: "${OCF_RESKEY_state_dir:=}"
: "${OCF_RESKEY_metrics_listen:=127.0.0.1:9743}"
: "${OCF_RESKEY_api_listen:=}"
: "${OCF_RESKEY_extra_args:=}"
: "${OCF_RESKEY_logfile:=/var/log/imfleet/controller.log}"
: "${OCF_RESKEY_pidfile:=${HA_RSCTMP}/${OCF_RESOURCE_INSTANCE}.pid}"
: "${OCF_RESKEY_stop_grace:=}"

meta_data() {
	cat <<END
<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="controller" version="1">
<version>1.1</version>
<longdesc lang="en">
Runs the imfleet controller daemon (controller serve), which watches the PortSIP IM
hosts and drives rolling upgrades, on the node that holds its state. Colocate it with
and order it after the filesystem resource holding the state (and the virtual IP its
API listens on), with meta critical=false so that its failures never move them:
controller ha install prints the commands.
</longdesc>
<shortdesc lang="en">imfleet controller daemon</shortdesc>
<parameters>
<parameter name="binary" unique="0">
<longdesc lang="en">Path of the controller executable.</longdesc>
<shortdesc lang="en">controller executable</shortdesc>
<content type="string" default="/usr/local/bin/controller"/>
</parameter>
<parameter name="state_dir" required="1" unique="1">
<longdesc lang="en">The controller's state directory, on the replicated filesystem.</longdesc>
<shortdesc lang="en">state directory</shortdesc>
<content type="string"/>
</parameter>
<parameter name="metrics_listen" unique="1">
<longdesc lang="en">Loopback address and port of /metrics, /healthz and /readyz for Prometheus (monitor asks /readyz on the daemon's socket).</longdesc>
<shortdesc lang="en">metrics address</shortdesc>
<content type="string" default="127.0.0.1:9743"/>
</parameter>
<parameter name="api_listen" unique="1">
<longdesc lang="en">Where operators' CLIs reach the API over TLS (the virtual IP and a port); empty: the local socket only.</longdesc>
<shortdesc lang="en">API address</shortdesc>
<content type="string" default=""/>
</parameter>
<parameter name="extra_args" unique="0">
<longdesc lang="en">Further arguments of controller serve (for instance --webhook-file FILE).</longdesc>
<shortdesc lang="en">more arguments</shortdesc>
<content type="string" default=""/>
</parameter>
<parameter name="logfile" unique="0">
<longdesc lang="en">File receiving the daemon's output.</longdesc>
<shortdesc lang="en">log file</shortdesc>
<content type="string" default="/var/log/imfleet/controller.log"/>
</parameter>
<parameter name="pidfile" unique="1">
<longdesc lang="en">PID file.</longdesc>
<shortdesc lang="en">PID file</shortdesc>
<content type="string" default="\${HA_RSCTMP}/\${OCF_RESOURCE_INSTANCE}.pid"/>
</parameter>
<parameter name="stop_grace" unique="0">
<longdesc lang="en">Seconds between SIGTERM and SIGKILL; default: the stop timeout less 5 s.</longdesc>
<shortdesc lang="en">stop grace</shortdesc>
<content type="integer" default=""/>
</parameter>
</parameters>
<actions>
<action name="start"        timeout="60s" />
<action name="stop"         timeout="40s" />
<action name="monitor"      timeout="20s" interval="10s" depth="0" />
<action name="meta-data"    timeout="5s" />
<action name="validate-all" timeout="10s" />
</actions>
</resource-agent>
END
}

# The daemon's pid, when it runs (the pid file's process runs our binary).
daemon_pid() {
	[ -s "$OCF_RESKEY_pidfile" ] || return 1
	pid=$(cat "$OCF_RESKEY_pidfile" 2>/dev/null)
	case "$pid" in ''|*[!0-9]*) return 1;; esac
	# By its command line, not /proc/PID/exe: a binary replaced by an
	# upgrade keeps running under its old inode.
	[ "$(tr '\000' '\n' 2>/dev/null <"/proc/$pid/cmdline" | head -n 1)" = "$OCF_RESKEY_binary" ] || return 1
	echo "$pid"
}

# The daemon of this state directory answers ready on its own socket.
ready() {
	curl -fsS -m 3 --noproxy '*' -o /dev/null \
		--unix-socket "$OCF_RESKEY_state_dir/run/serve.sock" http://imfleet/readyz 2>/dev/null
}

validate() {
	case "$OCF_RESKEY_state_dir" in
	/*) ;;
	*)
		ocf_exit_reason "parameter state_dir must be an absolute path"
		return "$OCF_ERR_CONFIGURED";;
	esac
	case "$OCF_RESKEY_metrics_listen" in
	127.*:[0-9]*|\[::1\]:[0-9]*) ;;
	*)
		ocf_exit_reason "metrics_listen $OCF_RESKEY_metrics_listen is not a loopback address and port"
		return "$OCF_ERR_CONFIGURED";;
	esac
	case "$OCF_RESKEY_stop_grace" in
	*[!0-9]*)
		ocf_exit_reason "stop_grace $OCF_RESKEY_stop_grace is not a number of seconds"
		return "$OCF_ERR_CONFIGURED";;
	esac
	if [ ! -x "$OCF_RESKEY_binary" ]; then
		ocf_exit_reason "$OCF_RESKEY_binary is not installed on this node"
		return "$OCF_ERR_INSTALLED"
	fi
	if ! command -v curl >/dev/null 2>&1; then
		ocf_exit_reason "curl is not installed on this node (monitor asks /readyz with it)"
		return "$OCF_ERR_INSTALLED"
	fi
	return "$OCF_SUCCESS"
}

monitor() {
	if ! daemon_pid >/dev/null; then
		[ -e "$OCF_RESKEY_pidfile" ] && ocf_log warn "the daemon of $OCF_RESKEY_pidfile is gone"
		return "$OCF_NOT_RUNNING"
	fi
	ocf_is_probe && return "$OCF_SUCCESS"
	if ! ready; then
		ocf_exit_reason "the daemon does not answer /readyz on $OCF_RESKEY_state_dir/run/serve.sock"
		return "$OCF_ERR_GENERIC"
	fi
	return "$OCF_SUCCESS"
}

# Seconds left before Pacemaker's timeout for this action, less a margin.
time_left() {
	left=$(( ${OCF_RESKEY_CRM_meta_timeout:-60000} / 1000 - 5 ))
	[ "$left" -lt 1 ] && left=1
	echo "$left"
}

start() {
	umask 077
	if pid=$(daemon_pid); then
		# Already started (perhaps still loading its hosts): wait for it
		# rather than start a second one.
		:
	else
		# Not mounted here (or never initialised): the daemon would refuse
		# too, but the reason is clearer from here.
		if [ ! -f "$OCF_RESKEY_state_dir/ca.pem" ]; then
			ocf_exit_reason "$OCF_RESKEY_state_dir holds no imfleet state: is the replicated filesystem mounted on this node?"
			return "$OCF_ERR_GENERIC"
		fi
		mkdir -p "$(dirname "$OCF_RESKEY_pidfile")"
		mkdir -p -m 0750 "$(dirname "$OCF_RESKEY_logfile")"
		rm -f "$OCF_RESKEY_pidfile"
		set -- --state-dir "$OCF_RESKEY_state_dir" serve --metrics-listen "$OCF_RESKEY_metrics_listen"
		[ -n "$OCF_RESKEY_api_listen" ] && set -- "$@" --api-listen "$OCF_RESKEY_api_listen"
		# extra_args is split into words on purpose (no globbing; no eval).
		# setsid and every stream redirected: pacemaker-execd must not wait
		# on the daemon's pipes.
		set -f
		# shellcheck disable=SC2086
		IMFLEET_LOG="${IMFLEET_LOG:-info}" setsid "$OCF_RESKEY_binary" "$@" $OCF_RESKEY_extra_args \
			</dev/null >>"$OCF_RESKEY_logfile" 2>&1 &
		pid=$!
		set +f
		echo "$pid" >"$OCF_RESKEY_pidfile"
	fi
	deadline=$(( $(date +%s) + $(time_left) ))
	while :; do
		if ! kill -0 "$pid" 2>/dev/null; then
			rm -f "$OCF_RESKEY_pidfile"
			ocf_exit_reason "controller serve exited at start: $(tail -n 3 "$OCF_RESKEY_logfile" 2>/dev/null | tr '\n' ' ' | cut -c1-400)"
			return "$OCF_ERR_GENERIC"
		fi
		if ready && kill -0 "$pid" 2>/dev/null; then
			ocf_log info "controller serve started (pid $pid)"
			return "$OCF_SUCCESS"
		fi
		if [ "$(date +%s)" -ge "$deadline" ]; then
			kill -KILL "$pid" 2>/dev/null
			rm -f "$OCF_RESKEY_pidfile"
			ocf_exit_reason "controller serve was not ready in time: $(tail -n 3 "$OCF_RESKEY_logfile" 2>/dev/null | tr '\n' ' ' | cut -c1-400)"
			return "$OCF_ERR_GENERIC"
		fi
		sleep 0.2
	done
}

stop() {
	if ! pid=$(daemon_pid); then
		rm -f "$OCF_RESKEY_pidfile"
		return "$OCF_SUCCESS"
	fi
	case "$OCF_RESKEY_stop_grace" in
	''|*[!0-9]*) grace=$(time_left);;
	*) grace=$OCF_RESKEY_stop_grace;;
	esac
	kill -TERM "$pid" 2>/dev/null
	waited=0
	while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt $(( grace * 10 )) ]; do
		sleep 0.1
		waited=$(( waited + 1 ))
	done
	if kill -0 "$pid" 2>/dev/null; then
		ocf_log warn "controller serve (pid $pid) outlived SIGTERM by ${grace} s: SIGKILL"
		kill -KILL "$pid" 2>/dev/null
		waited=0
		while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 50 ]; do
			sleep 0.1
			waited=$(( waited + 1 ))
		done
	fi
	rm -f "$OCF_RESKEY_pidfile"
	return "$OCF_SUCCESS"
}

case "$1" in
meta-data) meta_data; exit "$OCF_SUCCESS";;
usage|help) echo "usage: $0 {start|stop|monitor|validate-all|meta-data}"; exit "$OCF_SUCCESS";;
# Before any validation: a daemon that runs is stopped whatever the
# configuration or installation now says (the pid file and the command
# line need neither).
stop) stop; exit $?;;
esac

validate
rc=$?
if [ "$rc" -ne "$OCF_SUCCESS" ]; then
	case "$1" in
	# Not installed or configured here: a probe finds it not running (an
	# error would make Pacemaker act).
	monitor) ocf_is_probe && exit "$OCF_NOT_RUNNING"; exit "$rc";;
	*) exit "$rc";;
	esac
fi

case "$1" in
start) start;;
monitor|status) monitor;;
validate-all) exit "$OCF_SUCCESS";;
*) exit "$OCF_ERR_UNIMPLEMENTED";;
esac
