//! strom-cni under a real container runtime: podman 4 with its CNI backend (libcni), chained
//! with the reference portmap, tuning and bandwidth plugins.
//!
//! ```text
//!   podman (nsenter --net=<node>) ── libcni ──▶ strom-cni ─▶ portmap ─▶ tuning ─▶ bandwidth
//!   container c1 ─veth─┐                      ┌─veth─ container c2 (httpd :8080, -p 18080:8080)
//!                      └── stromd (node ns) ──┘
//! ```
//! podman runs in the node namespace through `nsenter --net` (not `ip netns exec`, whose
//! private /sys hides the cgroup mount runc needs), so everything it wires stays out of the
//! root namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use strom_tests::{bin_dir, net_lock, sh, Lab};

struct Podman {
    node_ns: String,
    conf: PathBuf,
    root: PathBuf,
    names: Vec<String>,
}

impl Podman {
    fn new(lab: &Lab) -> Podman {
        let base = lab.dir.join("podman");
        let netd = base.join("net.d");
        std::fs::create_dir_all(&netd).unwrap();
        let conf = base.join("containers.conf");
        std::fs::write(
            &conf,
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
                bin_dir().display(),
                netd.display()
            ),
        )
        .unwrap();
        let list = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "strom",
            "plugins": [
                {"type": "strom-cni", "socket": lab.socket().display().to_string(), "logFile": lab.dir.join("podman-cni.log").display().to_string(),
                 "ipam": {"type": "strom", "subnet": "198.18.16.0/20", "dataDir": lab.dir.join("podman-ipam").display().to_string()}},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
                {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.accept_redirects": "0"}},
                {"type": "bandwidth", "capabilities": {"bandwidth": true}}
            ]
        });
        std::fs::write(netd.join("strom.conflist"), list.to_string()).unwrap();
        let p = Podman {
            node_ns: lab.node_ns(),
            conf,
            root: base,
            names: Vec::new(),
        };
        let rootfs = p.root.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::create_dir_all(rootfs.join("www")).unwrap();
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .expect("busybox-static is installed by the setup script");
        for l in ["sh", "sleep", "ip", "ping", "wget", "httpd"] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(l)).unwrap();
        }
        std::fs::write(rootfs.join("www/index.html"), "hello-from-c2\n").unwrap();
        let tar = p.root.join("bb.tar");
        assert!(sh(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."))
        .status
        .success());
        let o = p.run(&["import", tar.to_str().unwrap(), "localhost/strom-bb:latest"]);
        assert!(
            o.status.success(),
            "podman import: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        p
    }

    fn run(&self, args: &[&str]) -> Output {
        sh(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_ns))
            .arg("podman")
            .arg("--root")
            .arg(self.root.join("storage"))
            .arg("--runroot")
            .arg(self.root.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("CONTAINERS_CONF", &self.conf))
    }

    fn start(&mut self, name: &str, extra: &[&str], cmd: &[&str]) {
        let mut a = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "strom",
            "--pull=never",
        ];
        a.extend_from_slice(extra);
        a.push("localhost/strom-bb:latest");
        a.extend_from_slice(cmd);
        self.names.push(name.to_string());
        let o = self.run(&a);
        assert!(
            o.status.success(),
            "podman run {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn ip_of(&self, name: &str) -> String {
        let o = self.run(&["exec", name, "ip", "-4", "-o", "addr", "show", "eth0"]);
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        text.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_else(|| panic!("no address: {text}"))
            .to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = self.run(&["rm", "-f", "-t", "0", n]);
        }
        let _ = self.run(&["system", "reset", "-f"]);
    }
}

fn leases(dir: &Path) -> usize {
    std::fs::read(dir.join("podman-ipam/strom/leases.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| v["leases"].as_object().map(|o| o.len()))
        .unwrap_or(0)
}

#[test]
fn podman_containers_talk_through_stromd_and_leave_nothing_behind() {
    let _g = net_lock();
    assert!(
        Path::new("/usr/bin/podman").exists(),
        "podman is installed by the setup script"
    );
    let lab = Lab::up("", &[]);
    let mut pm = Podman::new(&lab);
    pm.start("c1", &[], &["sleep", "1000"]);
    pm.start(
        "c2",
        &["-p", "18080:8080"],
        &["httpd", "-f", "-p", "8080", "-h", "/www"],
    );
    let c2 = pm.ip_of("c2");
    let ping = pm.run(&["exec", "c1", "ping", "-c", "2", "-W", "1", &c2]);
    assert!(
        ping.status.success(),
        "c1 pings c2: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let get = pm.run(&["exec", "c1", "wget", "-qO-", &format!("http://{c2}:8080/")]);
    assert_eq!(
        String::from_utf8_lossy(&get.stdout).trim(),
        "hello-from-c2",
        "TCP c1 -> c2"
    );
    let ports = lab.pod_ports();
    let names: Vec<&str> = ports
        .iter()
        .map(|p| p["spec"]["pod_name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{ports:?}");
    assert!(
        names.contains(&"c1") && names.contains(&"c2"),
        "K8S_POD_NAME from podman: {names:?}"
    );
    assert!(lab.rx_packets() > 0, "the traffic went through stromd");

    // hostPort through the chained portmap plugin, from the node.
    let get = "import socket\ns=socket.create_connection(('198.18.0.1',18080),timeout=3)\ns.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\nb=b''\nwhile True:\n    d=s.recv(4096)\n    if not d: break\n    b+=d\nprint(b.decode().split('\\r\\n\\r\\n',1)[1].strip())\n";
    let hp = sh(Command::new("ip").args(["netns", "exec", &lab.node_ns(), "python3", "-c", get]));
    let rules = sh(Command::new("ip").args([
        "netns",
        "exec",
        &lab.node_ns(),
        "iptables-save",
        "-t",
        "nat",
    ]));
    assert_eq!(
        String::from_utf8_lossy(&hp.stdout).trim(),
        "hello-from-c2",
        "hostPort 18080 -> c2:8080: {} / nat table: {}",
        String::from_utf8_lossy(&hp.stderr),
        String::from_utf8_lossy(&rules.stdout)
    );

    // restart: DEL then ADD; the container keeps working.
    let o = pm.run(&["restart", "-t", "0", "c1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ping = pm.run(&["exec", "c1", "ping", "-c", "1", "-W", "1", &c2]);
    assert!(
        ping.status.success(),
        "after restart: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    assert_eq!(lab.pod_ports().len(), 2);

    // stop and rm leave no veth, no lease and no stromd port.
    assert!(pm.run(&["stop", "-t", "0", "c1"]).status.success());
    assert_eq!(lab.pod_ports().len(), 1, "stop unregisters");
    for n in ["c1", "c2"] {
        assert!(pm.run(&["rm", "-f", "-t", "0", n]).status.success());
    }
    assert_eq!(lab.pod_ports().len(), 0);
    assert_eq!(leases(&lab.dir), 0);
    let links = sh(Command::new("ip").args(["-n", &lab.node_ns(), "-o", "link", "show"]));
    let text = String::from_utf8_lossy(&links.stdout);
    assert!(
        !text
            .lines()
            .any(|l| l.split(": ").nth(1).is_some_and(|n| n.starts_with("st"))),
        "no veth left: {text}"
    );
}
