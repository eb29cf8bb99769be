//! A real three-node Pacemaker/Corosync cluster from Debian's packages on
//! this one machine (see ../shared/reference/pacemaker-on-one-machine.md for
//! the account this follows). Each node has its own network, mount, UTS,
//! IPC and PID namespaces with tini as pid 1, so SIGKILL of that pid is the
//! node's power cut. The nodes share a bridge (10.240.0.0/24, in a
//! "switch" namespace); an ext4 image on a loop device stands in for
//! PortSIP's DRBD volume (`datapath_fs`, mounted on /srv/imfleet by
//! ocf:heartbeat:Filesystem on the active node only), a virtual IP
//! (10.240.0.100, ocf:heartbeat:IPaddr2) and ocf:pacemaker:Dummy for the
//! PBX services make up PortSIP's group `pbx`.
//!
//! What the loop device cannot show of DRBD: replication lag and split
//! brain (every node sees the one disk at once; exclusivity comes from
//! Pacemaker alone).

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const NODES: [&str; 3] = ["ha1", "ha2", "ha3"];
pub const VIP: &str = "10.240.0.100";
/// Where the daemon's API listens (the VIP).
pub const API: &str = "10.240.0.100:7444";
/// The state directory on the replicated filesystem, as nodes see it.
pub const STATE_DIR: &str = "/srv/imfleet/controller";
const PREFIX: &str = "imfc";
const NET: &str = "10.240.0";

pub struct Cluster {
    /// Shared with the nodes (not under /tmp: each node has its own /tmp).
    dir: PathBuf,
    loop_device: String,
    nodes: Vec<Option<Child>>,
    /// IM hosts joined to the switch: their link's index.
    joined: Vec<u8>,
    _lock: File,
}

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn must(program: &str, args: &[&str]) -> String {
    let out = output(Command::new(program).args(args));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn quiet(program: &str, args: &[&str]) {
    let _ = output(Command::new(program).args(args));
}

/// A cable from the switch (`port`, on its bridge) to `inside` in
/// namespace `ns`, which gets `address` (CIDR).
fn plug(port: &str, ns: &str, inside: &str, address: &str) {
    let sw = switch();
    let link = [
        "-n", &sw, "link", "add", port, "type", "veth", "peer", "name", inside, "netns", ns,
    ];
    must("ip", &link);
    must(
        "ip",
        &["-n", &sw, "link", "set", port, "master", "br0", "up"],
    );
    must("ip", &["-n", ns, "addr", "add", address, "dev", inside]);
    must("ip", &["-n", ns, "link", "set", inside, "up"]);
}

fn netns(node: &str) -> String {
    format!("{PREFIX}-{node}")
}

fn switch() -> String {
    format!("{PREFIX}-sw")
}

fn node_ip(i: usize) -> String {
    format!("{NET}.{}", i + 1)
}

/// What each node's pid 2 runs: a private view of the directories the
/// stack keeps state in, then corosync and pacemakerd; SIGTERM stops them
/// in order.
const NODE_INIT: &str = r#"#!/bin/bash
set -u
node=$1; dir=$2/$1
mount -t tmpfs -o mode=0755,size=64m tmpfs /run || exit 1
mount -t tmpfs -o mode=1777,size=256m tmpfs /dev/shm || exit 1
mount -t tmpfs -o mode=1777,size=64m tmpfs /tmp || exit 1
mkdir -p /run/lock /run/resource-agents /run/crm
chown hacluster:haclient /run/crm
for pair in etc-corosync:/etc/corosync var-lib-corosync:/var/lib/corosync \
    var-lib-pacemaker:/var/lib/pacemaker log-pacemaker:/var/log/pacemaker \
    log-corosync:/var/log/corosync srv:/srv; do
  mount --bind "$dir/${pair%%:*}" "${pair#*:}" || exit 1
done
mount --bind "$2/hosts" /etc/hosts
# Each node's own resource agents: what `ha install --apply` writes on one
# node is not on the others.
mount --bind "$dir/resource.d" /usr/lib/ocf/resource.d || exit 1
hostname "$node"
ip link set lo up
export PCMK_logfile=/var/log/pacemaker/pacemaker.log PCMK_logfacility=none
export HA_LOGFILE=/var/log/pacemaker/agents.log
corosync -f >>/var/log/corosync/stderr.log 2>&1 &
corosync=$!
for _ in $(seq 200); do
  corosync-cmapctl -g totem.cluster_name >/dev/null 2>&1 && break
  sleep 0.05
done
pacemakerd >>/var/log/pacemaker/pacemakerd.stderr 2>&1 &
pacemakerd=$!
stop() {
  kill -TERM $pacemakerd; wait $pacemakerd
  kill -TERM $corosync; wait $corosync
  exit 0
}
trap stop TERM INT
while :; do sleep 1 & wait $!; done
"#;

const COROSYNC_CONF: &str = "totem {
    version: 2
    cluster_name: imfleet-test
    transport: knet
    token: 1000
    crypto_cipher: aes256
    crypto_hash: sha256
}
nodelist {
@NODES@}
quorum {
    provider: corosync_votequorum
}
logging {
    to_logfile: yes
    logfile: /var/log/corosync/corosync.log
    to_syslog: no
    to_stderr: no
    timestamp: hires
}
";

/// A short dc-deadtime (the default 20 s delays the first election), no
/// fencing (nothing to fence with here), and a stopped minority.
const CIB_SEED: &str = r#"<cib crm_feature_set="3.16.1" validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="o-stonith" name="stonith-enabled" value="false"/>
        <nvpair id="o-quorum" name="no-quorum-policy" value="stop"/>
        <nvpair id="o-dc" name="dc-deadtime" value="2s"/>
        <nvpair id="o-recheck" name="cluster-recheck-interval" value="1min"/>
      </cluster_property_set>
    </crm_config>
    <nodes/><resources/><constraints/>
    <rsc_defaults><meta_attributes id="rsc-defaults"><nvpair id="rsc-stickiness" name="resource-stickiness" value="100"/></meta_attributes></rsc_defaults>
  </configuration>
  <status/>
</cib>
"#;

impl Cluster {
    /// Brings the cluster up with `state` (a controller state directory)
    /// on the shared disk and PortSIP's group running; returns once every
    /// node sees three nodes, quorum and a DC, and the group runs.
    pub fn up(state: &Path) -> Cluster {
        let lock = File::create("/var/tmp/imfleet-test-cluster.lock").unwrap();
        lock.lock().unwrap();
        let dir = PathBuf::from(format!("/var/tmp/imfleet-cluster-{}", std::process::id()));
        remove_leftovers();
        std::fs::create_dir_all(&dir).unwrap();
        let mut cluster = Cluster {
            loop_device: String::new(),
            dir,
            nodes: Vec::new(),
            joined: Vec::new(),
            _lock: lock,
        };
        cluster.write_config();
        cluster.make_disk(state);
        cluster.make_network();
        for (i, node) in NODES.iter().enumerate() {
            let child = cluster.start_node(i, node);
            cluster.nodes.push(Some(child));
        }
        cluster.wait_formed();
        cluster.add_pbx();
        cluster
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_config(&self) {
        let d = &self.dir;
        let nodes: String = NODES
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "    node {{\n        ring0_addr: {}\n        name: {n}\n        nodeid: {}\n    }}\n",
                    node_ip(i),
                    i + 1
                )
            })
            .collect();
        let conf = COROSYNC_CONF.replace("@NODES@", &nodes);
        let mut key = vec![0u8; 256];
        std::io::Read::read_exact(&mut File::open("/dev/urandom").unwrap(), &mut key).unwrap();
        std::fs::write(d.join("node-init.sh"), NODE_INIT).unwrap();
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for (i, n) in NODES.iter().enumerate() {
            hosts.push_str(&format!("{} {n}\n", node_ip(i)));
        }
        std::fs::write(d.join("hosts"), hosts).unwrap();
        for node in NODES {
            let nd = d.join(node);
            for sub in ["etc-corosync", "var-lib-corosync", "log-corosync", "srv"] {
                std::fs::create_dir_all(nd.join(sub)).unwrap();
            }
            for sub in ["cib", "pengine", "blackbox", "cores"] {
                std::fs::create_dir_all(nd.join("var-lib-pacemaker").join(sub)).unwrap();
            }
            std::fs::create_dir_all(nd.join("log-pacemaker/bundles")).unwrap();
            must(
                "cp",
                &[
                    "-a",
                    "/usr/lib/ocf/resource.d",
                    &nd.join("resource.d").display().to_string(),
                ],
            );
            std::fs::write(nd.join("etc-corosync/corosync.conf"), &conf).unwrap();
            std::fs::write(nd.join("etc-corosync/authkey"), &key).unwrap();
            std::fs::write(nd.join("var-lib-pacemaker/cib/cib.xml"), CIB_SEED).unwrap();
            for sub in ["var-lib-pacemaker", "log-pacemaker"] {
                must(
                    "chown",
                    &[
                        "-R",
                        "hacluster:haclient",
                        &nd.join(sub).display().to_string(),
                    ],
                );
            }
            must(
                "chmod",
                &[
                    "0400",
                    &nd.join("etc-corosync/authkey").display().to_string(),
                ],
            );
        }
    }

    /// The shared disk, holding `state` as the controller's state.
    fn make_disk(&mut self, state: &Path) {
        let image = self.dir.join("shared.img").display().to_string();
        must("truncate", &["-s", "128M", &image]);
        must("mkfs.ext4", &["-q", "-F", "-L", "imfleet-data", &image]);
        // It holds the CA key.
        must("chmod", &["0600", &image]);
        self.loop_device = must("losetup", &["-f", "--show", &image]).trim().to_owned();
        let mnt = self.dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let mnt = mnt.display().to_string();
        must("mount", &[&self.loop_device, &mnt]);
        // The disk is mounted on /srv/imfleet: the state is its `controller`.
        let copy = output(
            Command::new("cp")
                .arg("-a")
                .arg(state)
                .arg(format!("{mnt}/controller")),
        );
        must("umount", &[&mnt]);
        assert!(copy.status.success(), "copy the state: {copy:?}");
    }

    fn make_network(&self) {
        let sw = switch();
        must("ip", &["netns", "add", &sw]);
        must("ip", &["-n", &sw, "link", "set", "lo", "up"]);
        must("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        must(
            "ip",
            &[
                "-n",
                &sw,
                "addr",
                "add",
                &format!("{NET}.254/24"),
                "dev",
                "br0",
            ],
        );
        must("ip", &["-n", &sw, "link", "set", "br0", "up"]);
        for (i, node) in NODES.iter().enumerate() {
            let ns = netns(node);
            let port = format!("{node}-p");
            must("ip", &["netns", "add", &ns]);
            plug(&port, &ns, "eth0", &format!("{}/24", node_ip(i)));
            must("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
    }

    fn start_node(&self, i: usize, node: &str) -> Child {
        let log = File::create(self.dir.join(format!("{node}.console.log"))).unwrap();
        Command::new("ip")
            .args(["netns", "exec", &netns(node)])
            .args([
                "unshare",
                "--mount",
                "--uts",
                "--ipc",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "--propagation",
                "private",
                "--",
                "tini",
                "-s",
                "--",
                "bash",
            ])
            .arg(self.dir.join("node-init.sh"))
            .arg(node)
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start node {i}: {e}"))
    }

    /// The host pid of a node's pid 1 (tini), while it runs.
    fn init_pid(&self, node: &str) -> Option<i32> {
        let i = NODES.iter().position(|n| *n == node)?;
        let unshare = self.nodes[i].as_ref()?.id();
        let children =
            std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// A command run inside `node` (all of its namespaces).
    pub fn on(&self, node: &str, program: &str, args: &[&str]) -> Command {
        self.try_on(node, program, args)
            .unwrap_or_else(|| panic!("node {node} is not running"))
    }

    /// [`Cluster::on`], None while the node is not (yet, or any more) up.
    fn try_on(&self, node: &str, program: &str, args: &[&str]) -> Option<Command> {
        let pid = self.init_pid(node)?;
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &pid.to_string(),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "--",
            program,
        ])
        .args(args)
        .stdin(Stdio::null());
        Some(cmd)
    }

    /// Runs a command in `node`; its output (success asserted).
    pub fn must_on(&self, node: &str, program: &str, args: &[&str]) -> String {
        let out = output(&mut self.on(node, program, args));
        assert!(
            out.status.success(),
            "{node}: {program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `crm_mon` XML as `node` sees it.
    pub fn crm_mon(&self, node: &str) -> Option<String> {
        let mut cmd = self.try_on(node, "crm_mon", &["--one-shot", "--output-as=xml"])?;
        let out = output(&mut cmd);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until `check` holds of `node`'s `crm_mon` XML.
    pub fn wait_for(&self, node: &str, what: &str, limit: Duration, check: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if self.crm_mon(node).is_some_and(|xml| check(&xml)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within {limit:?}; {node} sees:\n{}",
                self.crm_mon(node).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_formed(&self) {
        for node in NODES {
            self.wait_for(
                node,
                "the cluster formed",
                Duration::from_secs(120),
                |xml| {
                    xml.matches(r#" online="true""#).count() == NODES.len()
                        && xml.contains(r#"present="true""#)
                        && xml.contains(r#"with_quorum="true""#)
                },
            );
        }
    }

    /// PortSIP's group: the replicated filesystem, the VIP, the services.
    fn add_pbx(&self) {
        let device = &self.loop_device;
        let xml = format!(
            r#"<resources><group id="pbx">
  <primitive id="datapath_fs" class="ocf" provider="heartbeat" type="Filesystem">
    <instance_attributes id="fs-ia"><nvpair id="fs-dev" name="device" value="{device}"/><nvpair id="fs-dir" name="directory" value="/srv/imfleet"/><nvpair id="fs-type" name="fstype" value="ext4"/></instance_attributes>
    <operations><op id="fs-mon" name="monitor" interval="10s" timeout="40s"/></operations>
  </primitive>
  <primitive id="vip" class="ocf" provider="heartbeat" type="IPaddr2">
    <instance_attributes id="vip-ia"><nvpair id="vip-ip" name="ip" value="{VIP}"/><nvpair id="vip-mask" name="cidr_netmask" value="24"/><nvpair id="vip-nic" name="nic" value="eth0"/></instance_attributes>
    <operations><op id="vip-mon" name="monitor" interval="10s" timeout="20s"/></operations>
  </primitive>
  <primitive id="pbx_services" class="ocf" provider="pacemaker" type="Dummy">
    <operations><op id="svc-mon" name="monitor" interval="10s" timeout="20s"/></operations>
  </primitive>
</group></resources>"#
        );
        self.must_on(
            NODES[0],
            "cibadmin",
            &["--replace", "--scope", "resources", "--xml-text", &xml],
        );
        self.wait_for(
            NODES[0],
            "the PBX group started",
            Duration::from_secs(60),
            |xml| running_on(xml, "pbx_services").is_some(),
        );
    }

    /// Where `resource` runs, as `node` sees it.
    pub fn location(&self, node: &str, resource: &str) -> Option<String> {
        running_on(&self.crm_mon(node)?, resource)
    }

    /// Joins an IM host's network namespace to the switch, so that every
    /// node reaches `address` (the host's own, which its certificate names).
    pub fn join_host(&mut self, host_netns: &str, address: Ipv4Addr) {
        let k = self.joined.len() as u8 + 1;
        let (port, inside) = (format!("{PREFIX}-h{k}"), format!("{PREFIX}-c{k}"));
        let link = format!("{NET}.{}", 20 + k);
        plug(&port, host_netns, &inside, &format!("{link}/24"));
        for node in NODES {
            must(
                "ip",
                &[
                    "-n",
                    &netns(node),
                    "route",
                    "add",
                    &format!("{address}/32"),
                    "via",
                    &link,
                ],
            );
        }
        self.joined.push(k);
    }

    /// The node's power cut: its pid 1 killed (every process of it dies,
    /// its mounts go) and its cable pulled (its namespace would keep the VIP).
    pub fn kill_node(&self, node: &str) {
        let pid = self.init_pid(node).expect("the node runs");
        must("kill", &["-9", &pid.to_string()]);
        must(
            "ip",
            &["-n", &switch(), "link", "set", &format!("{node}-p"), "down"],
        );
    }

    /// The node's logs, for a failing assertion.
    pub fn logs(&self, node: &str) -> String {
        let nd = self.dir.join(node);
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let tail = |text: String| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "== {node} agents.log\n{}\n== {node} imfleet-controller.log\n{}",
            tail(read(nd.join("log-pacemaker/agents.log"))),
            tail(read(nd.join("log-pacemaker/imfleet-controller.log")))
        )
    }
}

/// The node a resource runs on, from `crm_mon` XML (read as `controller
/// ha status` reads it).
pub fn running_on(xml: &str, resource: &str) -> Option<String> {
    let status = imfleet_controller::ha::cib::status(xml, resource, &[]).ok()?;
    let daemon = status.daemon?;
    if daemon.active && daemon.role == "Started" {
        daemon.nodes.into_iter().next()
    } else {
        None
    }
}

/// What a cluster of a killed test run left: its namespaces, loop device
/// and directory (one cluster at a time runs, under the lock).
fn remove_leftovers() {
    remove_network(&[]);
    for entry in std::fs::read_dir("/var/tmp").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("imfleet-cluster-") {
            continue;
        }
        let image = entry.path().join("shared.img").display().to_string();
        let attached = output(Command::new("losetup").args(["-j", &image]));
        for line in String::from_utf8_lossy(&attached.stdout).lines() {
            if let Some(device) = line.split(':').next() {
                quiet("losetup", &["-d", device]);
            }
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

fn remove_network(joined: &[u8]) {
    // A killed run's nodes still run in their namespaces: end them first.
    for node in NODES {
        let pids = output(Command::new("ip").args(["netns", "pids", &netns(node)]));
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            quiet("kill", &["-9", pid]);
        }
    }
    for k in joined {
        quiet(
            "ip",
            &["-n", &switch(), "link", "del", &format!("{PREFIX}-h{k}")],
        );
    }
    for node in NODES {
        quiet("ip", &["netns", "del", &netns(node)]);
    }
    quiet("ip", &["netns", "del", &switch()]);
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            // The unshare process, with --kill-child: its node goes too.
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_network(&self.joined);
        if !self.loop_device.is_empty() {
            quiet("losetup", &["-d", &self.loop_device]);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
