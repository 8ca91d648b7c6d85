//! Interface plumbing over rtnetlink, in-process: no `ip` processes on the ADD/DEL path.
//!
//! The pod side is configured from a short-lived thread that has joined the pod's network
//! namespace (setns(2) affects only the calling thread); netlink sockets opened there belong
//! to that namespace, and so do processes it starts (ethtool).

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use futures::stream::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteMetric, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

const EEXIST: i32 = 17;
const ENODEV: i32 = 19;

/// Runs `f` with a netlink handle of the current thread's namespace.
fn with_handle<T>(f: impl AsyncFnOnce(Handle) -> Result<T, String>) -> Result<T, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
        let task = tokio::spawn(conn);
        let r = f(handle).await;
        task.abort();
        r
    })
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

async fn index_of(h: &Handle, name: &str) -> Result<Option<u32>, String> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(format!("looking up {name}: {e}")),
    }
}

async fn set_up(h: &Handle, idx: u32, name: &str) -> Result<(), String> {
    h.link()
        .set(LinkUnspec::new_with_index(idx).up().build())
        .execute()
        .await
        .map_err(|e| format!("setting {name} up: {e}"))
}

/// A /32 route to `dst` straight out of interface `idx` (scope link).
fn on_link(dst: Ipv4Addr, idx: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, 32)
        .output_interface(idx)
        .scope(RouteScope::Link)
        .build()
}

/// The pod side being configured in its own thread.
pub type PodSide = std::thread::JoinHandle<Result<(), String>>;

/// The outcome of creating the pair.
pub enum Created {
    /// Wired on the node side; the pod side is being configured (`join` it).
    Ok(PodSide),
    /// The host-side name is taken: the container is wired already.
    Exists,
}

/// Waits for the pod side.
pub fn join(p: PodSide) -> Result<(), String> {
    p.join()
        .map_err(|_| "pod namespace thread panicked".to_string())?
}

/// The pod's routes beyond the on-link one to its gateway, all through the gateway.
#[derive(Debug, Clone)]
pub struct PodRoutes {
    /// The default route's MTU, where it is below the interface's (paths leaving the node).
    pub path_mtu: Option<u32>,
    /// The node's pod subnet and the cluster's Service CIDRs, at the interface's MTU.
    pub local: Vec<ipnet::Ipv4Net>,
}

/// Node side: the veth pair (peer moved into `netns` as `ifname` with `mac`), the host end up,
/// the pod's /32 route and permanent neighbour entry. As soon as the pair exists the pod side
/// starts in parallel (`wire_pod`, with gateway `gw` and `routes`).
#[allow(clippy::too_many_arguments)]
pub fn wire_node(
    host: &str,
    ifname: &str,
    mac: [u8; 6],
    mtu: u32,
    netns: File,
    ip: Ipv4Addr,
    gw: Ipv4Addr,
    routes: PodRoutes,
) -> Result<Created, String> {
    with_handle(async |h| {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(ifname.to_string())
            .address(mac.to_vec())
            .mtu(mtu)
            .setns_by_fd(netns.as_raw_fd())
            .build();
        let pair = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(host.to_string())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        match h.link().add(pair).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(EEXIST) => return Ok(Created::Exists),
            Err(e) => return Err(format!("creating {host}/{ifname}: {e}")),
        }
        let pod = wire_pod(netns, ifname, ip, gw, routes);
        let idx = index_of(&h, host)
            .await?
            .ok_or_else(|| format!("{host} vanished"))?;
        set_up(&h, idx, host).await?;
        h.route()
            .add(on_link(ip, idx))
            .replace()
            .execute()
            .await
            .map_err(|e| format!("route to {ip}: {e}"))?;
        h.neighbours()
            .add(idx, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| format!("neighbour {ip}: {e}"))?;
        Ok(Created::Ok(pod))
    })
}

/// Pod side, inside `netns`, in a thread of its own: offloads off (ethtool), interface up, the
/// /32 address, an on-link route to the gateway, the default route through it (at the path's
/// MTU) and the routes to the node's pod subnet and the Service CIDRs (at the interface's).
fn wire_pod(netns: File, ifname: &str, ip: Ipv4Addr, gw: Ipv4Addr, routes: PodRoutes) -> PodSide {
    let ifname = ifname.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering the pod namespace: {e}"))?;
        // Frames reaching stromd through AF_XDP carry no offload state: no segmentation (an XDP
        // program on the host side clears it anyway), and complete checksums by default (stromd
        // also serves partial ones, docs/design.md, but a pod is no faster with them). ethtool
        // runs in this thread's namespace.
        let out = Command::new("ethtool")
            .args(["-K", &ifname, "tx", "off", "tso", "off", "gso", "off"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("ethtool: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ethtool -K {ifname}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        with_handle(async |h| {
            let idx = index_of(&h, &ifname)
                .await?
                .ok_or_else(|| format!("{ifname} is not in the pod"))?;
            set_up(&h, idx, &ifname).await?;
            h.address()
                .add(idx, IpAddr::V4(ip), 32)
                .execute()
                .await
                .map_err(|e| format!("address {ip}/32: {e}"))?;
            h.route()
                .add(on_link(gw, idx))
                .execute()
                .await
                .map_err(|e| format!("route to {gw}: {e}"))?;
            let mut default = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gw)
                .output_interface(idx)
                .build();
            if let Some(m) = routes.path_mtu {
                default
                    .attributes
                    .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(m)]));
            }
            h.route()
                .add(default)
                .execute()
                .await
                .map_err(|e| format!("default route: {e}"))?;
            for net in routes.local {
                let local = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(net.network(), net.prefix_len())
                    .gateway(gw)
                    .output_interface(idx)
                    .build();
                h.route()
                    .add(local)
                    .execute()
                    .await
                    .map_err(|e| format!("route to {net}: {e}"))?;
            }
            Ok(())
        })
    })
}

/// Deletes a node-side link by name; a missing one is fine.
pub fn delete_link(name: &str) -> Result<(), String> {
    with_handle(async |h| {
        let Some(idx) = index_of(&h, name).await? else {
            return Ok(());
        };
        match h.link().del(idx).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
            Err(e) => Err(format!("deleting {name}: {e}")),
        }
    })
}
