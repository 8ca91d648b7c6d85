//! strom-control: keeps stromd's Services and NetworkPolicies equal to what the cluster
//! says, from the Kubernetes API or from a directory of manifests.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use strom_control::cluster::Cluster;
use strom_control::k8s_openapi;
use strom_control::manifests::Settings;
use strom_control::metrics::{self, Metrics, Reporter};
use strom_control::source::{self, Driver};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// This node's name, as its pods' `spec.nodeName` gives it: its pods are the ones the
    /// policies isolate, its endpoints the local ones.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// stromd's socket.
    #[arg(long, default_value = strom_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// A kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the pod's service
    /// account when running in the cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Take the objects from this directory of manifests instead of an API server, doing
    /// what the cluster's controllers would (ClusterIPs, NodePorts, EndpointSlices).
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// With --manifests: where ClusterIPs come from.
    #[arg(long, default_value = "10.96.0.0/16")]
    service_cidr: ipnet::Ipv4Net,
    /// With --manifests: how often the directory is looked at for changes.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    /// Longest a change waits for others to join its batch.
    #[arg(long, default_value_t = 10)]
    batch_ms: u64,
    /// Where /metrics, /healthz and /readyz are served (empty: nowhere).
    #[arg(long, default_value = "127.0.0.1:9102")]
    metrics_addr: String,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Writes this node's pod CIDR and internal addresses, from its Node object, as shell
    /// variables (POD_CIDR, NODE_ADDRS) for stromd's and strom-cni's setup, and exits.
    NodeConfig {
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run(args))
}

async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig ($KUBECONFIG, ~/.kube/config) and not in a cluster")?,
    };
    tracing::info!(server = %config.cluster_url, "Kubernetes API");
    kube::Client::try_from(config).context("Kubernetes client")
}

/// `node-config`: the Node's settings into `out` (written whole, then renamed).
async fn node_config(args: &Args, out: &std::path::Path) -> anyhow::Result<()> {
    let client = client(args.kubeconfig.as_deref()).await?;
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    let node = nodes
        .get(&args.node_name)
        .await
        .with_context(|| format!("reading Node {}", args.node_name))?;
    let settings = strom_control::node::NodeSettings::of(&node)?;
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, settings.env()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    tracing::info!(pod_cidr = %settings.pod_cidr, addresses = ?settings.addresses, out = %out.display(), "node settings written");
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(Cmd::NodeConfig { out }) = &args.cmd {
        return node_config(&args, out).await;
    }
    let metrics = Metrics::new();
    let reporter = Reporter(metrics.clone());
    if !args.metrics_addr.is_empty() {
        let listener = tokio::net::TcpListener::bind(&args.metrics_addr)
            .await
            .with_context(|| format!("metrics address {}", args.metrics_addr))?;
        tracing::info!(addr = %args.metrics_addr, "serving /metrics, /healthz, /readyz");
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listener, m).await {
                tracing::error!(error = %e, "metrics server ended");
            }
        });
    }
    let programmer = strom_control::program::spawn(args.socket.clone(), reporter.clone())
        .context("starting the programmer thread")?;
    let mut driver = Driver::new(Cluster::new(&args.node_name), programmer, reporter.clone());
    let batch = Duration::from_millis(args.batch_ms);
    tracing::info!(node = %args.node_name, socket = %args.socket.display(), "strom-control starting");

    if let Some(dir) = args.manifests {
        let settings = Settings::new(args.service_cidr);
        tracing::info!(dir = %dir.display(), "objects from a manifests directory");
        tokio::task::spawn_blocking(move || {
            source::dir::run(
                &dir,
                &settings,
                &mut driver,
                Duration::from_millis(args.poll_ms),
            )
        })
        .await
        .context("the manifests reader ended")?;
        return Ok(());
    }

    let client = client(args.kubeconfig.as_deref()).await?;
    let mut errors = reporter;
    source::kube::run(client, &mut driver, &mut errors, batch).await;
    anyhow::bail!("the Kubernetes watches ended")
}
