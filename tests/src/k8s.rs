//! A real Kubernetes control plane on loopback for the tests, as controller-runtime's envtest
//! runs one: etcd, kube-apiserver and kube-controller-manager (for the real EndpointSlice
//! controller), built from source by `scripts/k8s-bins` (cached after the first build), no
//! kubelet and no scheduler. Stopped (by process id) on drop; its files (logs, etcd data) are
//! removed then, except after a failure, to be read.
//!
//! Tests reach it through [`ControlPlane::client`] (kube-rs, admin token) and hand
//! [`ControlPlane::kubeconfig`] to strom-control, which gets a token with read access only
//! (RBAC as `configs/` grants it).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::pinned_kind;
use serde_json::Value;

use crate::{sh, Daemon};

/// The token the tests use (system:masters).
const ADMIN_TOKEN: &str = "strom-test-admin";
/// The token strom-control uses (user strom-control, only what RBAC gives it).
const CONTROL_TOKEN: &str = "strom-test-control";
/// The Services' range: the lab's (198.19.0.0/16, routed to nothing but stromd).
pub const SERVICE_CIDR: &str = "198.19.0.0/16";

/// Where the control plane's binaries are: built (once) by `scripts/k8s-bins`.
pub fn bins() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/k8s-bins");
    let out = sh(Command::new(&script).stderr(Stdio::inherit()));
    assert!(
        out.status.success(),
        "{}: the Kubernetes control plane could not be built",
        script.display()
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("bin")
}

/// A free TCP port on loopback (the kernel's pick; taken again at once by the caller).
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct free TCP ports on loopback: each is held until all are picked, so the
/// kernel cannot hand the same one out twice. (Another process may still take one before
/// the caller does; the kernel picks ephemeral ports in a random order, which makes that
/// rare, and a daemon that cannot bind fails the test with its log.)
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("bound").port())
}

/// One of the control plane's processes, logging to `<dir>/<name>.log`.
fn daemon(name: &str, bin: PathBuf, args: Vec<String>, dir: &Path) -> Daemon {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    Daemon::start(cmd, &dir.join(format!("{name}.log")))
}

/// etcd, kube-apiserver and kube-controller-manager.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub api_port: u16,
    pub etcd_port: u16,
    etcd: Daemon,
    apiserver: Daemon,
    controller_manager: Daemon,
    pub rt: tokio::runtime::Runtime,
    client: kube::Client,
}

impl ControlPlane {
    /// Starts the three and waits until the API server is ready and the EndpointSlice
    /// controller runs.
    pub fn start() -> ControlPlane {
        let bin = bins();
        let dir = std::env::temp_dir().join(format!(
            "strom-k8s-{}-{}",
            std::process::id(),
            crate::SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        pki(&dir);
        std::fs::write(
            dir.join("tokens.csv"),
            format!(
                "{ADMIN_TOKEN},admin,admin,system:masters\n{CONTROL_TOKEN},strom-control,strom-control\n"
            ),
        )
        .unwrap();
        let [etcd_port, peer_port, api_port, kcm_port] = free_ports::<4>();
        let d = |p: &str| dir.join(p).to_string_lossy().to_string();
        let etcd = daemon(
            "etcd",
            bin.join("etcd"),
            vec![
                format!("--data-dir={}", d("etcd")),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
            &dir,
        );
        let apiserver = daemon(
            "kube-apiserver",
            bin.join("kube-apiserver"),
            vec![
                format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
                format!("--cert-dir={}", d("certs")),
                format!("--tls-cert-file={}", d("apiserver.crt")),
                format!("--tls-private-key-file={}", d("apiserver.key")),
                format!("--secure-port={api_port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--authorization-mode=RBAC".into(),
                format!("--token-auth-file={}", d("tokens.csv")),
                "--allow-privileged=true".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
                format!("--service-account-issuer=https://127.0.0.1:{api_port}/"),
                format!("--service-account-key-file={}", d("sa.pub")),
                format!("--service-account-signing-key-file={}", d("sa.key")),
                "--v=1".into(),
            ],
            &dir,
        );
        std::fs::write(
            dir.join("admin.kubeconfig"),
            kubeconfig(api_port, &dir.join("ca.crt"), ADMIN_TOKEN),
        )
        .unwrap();
        std::fs::write(
            dir.join("control.kubeconfig"),
            kubeconfig(api_port, &dir.join("ca.crt"), CONTROL_TOKEN),
        )
        .unwrap();
        let controller_manager = daemon(
            "kube-controller-manager",
            bin.join("kube-controller-manager"),
            vec![
                format!("--kubeconfig={}", d("admin.kubeconfig")),
                "--leader-elect=false".into(),
                "--controllers=endpointslice,endpointslicemirroring".into(),
                "--allocate-node-cidrs=false".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={kcm_port}"),
                format!("--cert-dir={}", d("kcm-certs")),
                "--v=1".into(),
            ],
            &dir,
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let kc = kube::config::Kubeconfig::read_from(dir.join("admin.kubeconfig")).unwrap();
            let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            kube::Client::try_from(cfg).unwrap()
        });
        let cp = ControlPlane {
            dir,
            api_port,
            etcd_port,
            etcd,
            apiserver,
            controller_manager,
            rt,
            client,
        };
        cp.wait_ready(Duration::from_secs(120));
        cp
    }

    /// Waits until `/readyz` answers ok.
    pub fn wait_ready(&self, within: Duration) {
        let t = Instant::now();
        loop {
            let out = sh(Command::new("curl").args([
                "-sS",
                "--max-time",
                "2",
                "--cacert",
                &self.dir.join("ca.crt").to_string_lossy(),
                "-H",
                &format!("Authorization: Bearer {ADMIN_TOKEN}"),
                &format!("https://127.0.0.1:{}/readyz", self.api_port),
            ]));
            if String::from_utf8_lossy(&out.stdout).trim() == "ok" {
                return;
            }
            assert!(
                t.elapsed() < within,
                "kube-apiserver not ready in {within:?}: {}\n--- kube-apiserver\n{}\n--- etcd\n{}",
                String::from_utf8_lossy(&out.stdout),
                self.apiserver.tail(30),
                self.etcd.tail(30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The admin client.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// strom-control's kubeconfig (its own user; RBAC decides what it may read, see
    /// [`ControlPlane::grant_strom_control`]).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("control.kubeconfig")
    }

    /// strom-control's read access: the ClusterRole of `configs/k8s/strom.yaml`, bound to
    /// the user of [`ControlPlane::kubeconfig`].
    pub fn grant_strom_control(&self) {
        let all = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/k8s/strom.yaml"),
        )
        .expect("configs/k8s/strom.yaml");
        let role = all
            .split("\n---\n")
            .find(|d| d.contains("kind: ClusterRole\n"))
            .expect("configs/k8s/strom.yaml has strom-control's ClusterRole");
        self.apply(role);
        self.apply(
            "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: strom-control-test-user}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: strom-control}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: strom-control}]
",
        );
    }

    /// Creates (or, when it exists, replaces by server-side apply) every object of a YAML
    /// stream, whatever its kind.
    pub fn apply(&self, yaml: &str) {
        self.rt.block_on(async {
            for doc in serde_yaml::Deserializer::from_str(yaml) {
                let v: Value = serde::Deserialize::deserialize(doc).unwrap();
                if v.is_null() {
                    continue;
                }
                let obj: DynamicObject = serde_json::from_value(v.clone()).unwrap();
                let api = self.dynamic_api(&obj).await;
                let name = obj.metadata.name.clone().unwrap();
                let pp = PatchParams::apply("strom-tests").force();
                api.patch(&name, &pp, &Patch::Apply(&v))
                    .await
                    .unwrap_or_else(|e| panic!("apply {name}: {e}"));
            }
        })
    }

    /// Deletes an object by kind, namespace and name (gone already is fine).
    pub fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) {
        self.rt.block_on(async {
            let api = self.api_of(api_version, kind, namespace).await;
            match api.delete(name, &Default::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => panic!("delete {kind} {name}: {e}"),
            }
        })
    }

    /// Writes a pod's status as the kubelet would: running at `ip`, ready or not.
    pub fn pod_status(&self, namespace: &str, name: &str, ip: &str, ready: bool) {
        let status = serde_json::json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}],
        }});
        self.apply_status("v1", "Pod", Some(namespace), name, status);
    }

    /// Merges `patch` into an object's status (the status subresource).
    pub fn apply_status(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        patch: Value,
    ) {
        self.rt.block_on(async {
            let api = self.api_of(api_version, kind, namespace).await;
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap_or_else(|e| panic!("status of {kind} {name}: {e}"));
        })
    }

    /// An object as JSON (None: not found).
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        self.rt.block_on(async {
            let api = self.api_of(api_version, kind, namespace).await;
            api.get_opt(name)
                .await
                .unwrap()
                .map(|o| serde_json::to_value(o).unwrap())
        })
    }

    /// The API of a kind (in `namespace` when it is namespaced).
    async fn api_of(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
    ) -> Api<DynamicObject> {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": api_version, "kind": kind,
            "metadata": {"namespace": namespace},
        }))
        .unwrap();
        self.dynamic_api(&obj).await
    }

    async fn dynamic_api(&self, obj: &DynamicObject) -> Api<DynamicObject> {
        let types = obj.types.as_ref().expect("apiVersion and kind");
        let gvk = GroupVersionKind::try_from(types).unwrap();
        let (ar, caps) = pinned_kind(&self.client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("kind {gvk:?}: {e}"));
        match (caps.scope, obj.metadata.namespace.as_deref()) {
            (kube::discovery::Scope::Namespaced, ns) => {
                Api::namespaced_with(self.client.clone(), ns.unwrap_or("default"), &ar)
            }
            (kube::discovery::Scope::Cluster, _) => Api::all_with(self.client.clone(), &ar),
        }
    }

    /// Stops the API server (etcd and the controller manager stay).
    pub fn stop_apiserver(&mut self) {
        self.apiserver.stop();
    }

    /// Starts the API server again and waits until it is ready.
    pub fn start_apiserver(&mut self) {
        self.apiserver.spawn();
        self.wait_ready(Duration::from_secs(120));
    }

    /// Compacts etcd's history up to now (through its JSON gateway): a watch that resumes
    /// from an older resourceVersion gets 410 Gone and must list again.
    pub fn compact_etcd(&self) {
        let url = |p: &str| format!("http://127.0.0.1:{}/v3/{p}", self.etcd_port);
        let out = sh(Command::new("curl").args([
            "-sS",
            "-X",
            "POST",
            &url("kv/range"),
            "-d",
            r#"{"key":"AA=="}"#,
        ]));
        let v: Value = serde_json::from_slice(&out.stdout).expect("etcd range answer");
        let rev = v["header"]["revision"]
            .as_str()
            .expect("etcd revision")
            .to_string();
        let out = sh(Command::new("curl").args([
            "-sS",
            "-X",
            "POST",
            &url("kv/compaction"),
            "-d",
            &format!(r#"{{"revision":"{rev}","physical":true}}"#),
        ]));
        assert!(
            out.status.success(),
            "etcd compaction: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The last lines of a component's log, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- kube-apiserver\n{}\n--- kube-controller-manager\n{}\n--- etcd\n{}",
            self.apiserver.tail(30),
            self.controller_manager.tail(30),
            self.etcd.tail(30)
        )
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.controller_manager.stop();
        self.apiserver.stop();
        self.etcd.stop();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A kubeconfig for `token` against the API server on `port`.
fn kubeconfig(port: u16, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority: {}
users:
- name: u
  user:
    token: {token}
contexts:
- name: test
  context: {{cluster: test, user: u}}
current-context: test
",
        ca.display()
    )
}

/// A CA, the API server's serving certificate for 127.0.0.1 signed by it, and the service
/// account key pair, made with openssl.
fn pki(dir: &Path) {
    let run = |args: &[&str]| {
        let out = sh(Command::new("openssl").args(args).current_dir(dir));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["genrsa", "-out", "ca.key", "2048"]);
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-days",
        "2",
        "-subj",
        "/CN=strom-test-ca",
        "-out",
        "ca.crt",
    ]);
    run(&["genrsa", "-out", "apiserver.key", "2048"]);
    run(&[
        "req",
        "-new",
        "-key",
        "apiserver.key",
        "-subj",
        "/CN=kube-apiserver",
        "-out",
        "apiserver.csr",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "apiserver.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "apiserver.crt",
    ]);
    run(&["genrsa", "-out", "sa.key", "2048"]);
    run(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}
