// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
// strom's XDP programs. Built by dataplane/build.rs with
//   clang -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu
// and loaded by stromd (aya).
//   strom_pod     on every pod host-side veth (`xdp.frags`: frames may span several buffers;
//                 it reads the headers in the first): traffic for the node's own addresses but for
//                 NodePorts and stromd's SNAT ports, and ICMP errors about them (and ARP
//                 that is not for the pod gateway) goes to the kernel once its source MAC and
//                 address are the pod's (`pod_src`; anti-spoofing for what stromd never sees),
//                 everything else to the port's AF_XDP socket. With no socket bound the frame
//                 is dropped (fail closed): a pod never reaches another pod around stromd.
//   strom_uplink  on the uplink: only IPv4 for the prefixes stromd owns (`owned`: the pod CIDR,
//                 Services' external and load-balancer IPs) and for the node's addresses on
//                 NodePorts and stromd's SNAT ports (`node_ports`, `snat_ports`; the later
//                 fragments of a datagram whose first went to stromd, `frag_ids`), ICMP
//                 errors quoting packets from those ports, and echo replies to the
//                 identifiers of pods' masqueraded pings (`echo_ids`), goes to the socket; everything
//                 else (ARP, the node's own traffic) goes to the kernel, so the node keeps
//                 its own connectivity. With no socket bound what
//                 stromd owns is dropped (fail closed), never forwarded by the kernel.
// stromd pins the programs' links, so they stay attached, and fail closed, while stromd is
// stopped or restarting; a new stromd swaps its own programs in atomically.
// A port has one AF_XDP socket per receive queue: frames go to the socket of the queue they
// arrived on (`port_slot` is keyed by interface and queue). The programs run on the sending
// pod's core for every frame, so the common case takes no hash lookup: queue 0 of an interface
// with an ifindex under 65536 finds its slot in an array (`slot0`), and a destination inside
// the pod CIDR (`pod_net`) cannot be one of the node's own addresses.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define MAX_PORTS 4096

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct port_key {
	__u32 ifindex;
	__u32 queue;
};

/* (ifindex, rx queue) -> slot in xsks */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PORTS);
	__type(key, struct port_key);
	__type(value, __u32);
} port_slot SEC(".maps");

#define SLOT0_ENTRIES 65536

/* ifindex -> slot + 1 in xsks of the interface's queue 0 (0: none); others: port_slot */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SLOT0_ENTRIES);
	__type(key, __u32);
	__type(value, __u32);
} slot0 SEC(".maps");

struct v4_net {
	__u32 addr; /* network byte order */
	__u32 mask; /* network byte order; 0: not set */
};

/* the pod CIDR (key 0): node addresses lie outside it (stromd's config refuses otherwise) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct v4_net);
} pod_net SEC(".maps");

/* IPv4 addresses of the node itself (network byte order) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u8);
} node_addrs SEC(".maps");

/* the pod gateway address (key 0), network byte order */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} gateway SEC(".maps");

struct lpm_v4 {
	__u32 prefixlen;
	__u32 addr;
};

/* IPv4 prefixes stromd owns on the uplink (the pod CIDR; Services' external and
 * load-balancer IPs as /32s) */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4);
	__type(value, __u8);
} owned SEC(".maps");

struct l4_port {
	__u16 port; /* network byte order */
	__u8 proto;
	__u8 pad;
};

/* (protocol, port) on the node's own addresses that are stromd's: NodePorts */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct l4_port);
	__type(value, __u8);
} node_ports SEC(".maps");

struct port_range {
	__u16 lo; /* host byte order, inclusive; lo > hi: none */
	__u16 hi;
};

/* Source ports stromd translates to on the node's addresses (SNAT for external traffic to
 * Services, masquerade of pods' traffic to the outside): the answers, addressed to the node,
 * are stromd's (key 0). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct port_range);
} snat_ports SEC(".maps");

/* ICMP echo identifiers stromd masquerades pods' pings to, a bit each (word id / 64, bit
 * id % 64): stromd's workers set and clear them through a shared mapping of the map, so the
 * echo replies to the node that carry one are handed to stromd, and the node's own pings'
 * replies, whose identifiers the kernel picks, stay the kernel's. */
#define ECHO_ID_WORDS 1024
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ECHO_ID_WORDS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
} echo_ids SEC(".maps");

/* The datagrams from outside to the node's addresses whose first fragment went to stromd (to
 * a NodePort or a SNAT port), with when it came (ns, bpf_ktime_get_ns): their later
 * fragments, which carry no ports, go to stromd too for FRAG_NS after it, and stromd gives
 * them the first one's translation (conntrack/frag.rs, the same 30 s). A later fragment that
 * comes before its first stays the kernel's (Cilium's fragment map works the same way). Only
 * the uplink's program records: what a pod sends cannot steer the outside's fragments. */
#define FRAG_NS (30ULL * 1000 * 1000 * 1000)
struct frag_key {
	__u32 saddr;
	__u32 daddr;
	__u16 id;
	__u8 proto;
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct frag_key);
	__type(value, __u64);
} frag_ids SEC(".maps");

#define POD_SRC_IPS 4

/* What a pod may send from: its MAC and up to POD_SRC_IPS IPv4 addresses (network order). */
struct pod_src {
	__u8 mac[6];
	__u16 n_ips;
	__u32 ips[POD_SRC_IPS];
};

/* ifindex of a pod's host-side veth -> what the pod may send from */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PORTS);
	__type(key, __u32);
	__type(value, struct pod_src);
} pod_src SEC(".maps");

/* Frames the programs dropped, by reason (index: enum xdp_drop in bpf.rs's order). */
#define XDP_DROP_SPOOFED 0
#define XDP_DROP_NO_SOCKET 1
#define XDP_DROP_REASONS 2
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XDP_DROP_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} xdp_drops SEC(".maps");

static __always_inline int drop(__u32 reason)
{
	__u64 *c = bpf_map_lookup_elem(&xdp_drops, &reason);
	if (c)
		*c += 1;
	return XDP_DROP;
}

struct arp_ipv4 {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[6];
	__u8 spa[4];
	__u8 tha[6];
	__u8 tpa[4];
} __attribute__((packed));

/* The xsks slot of the frame's interface and queue, or -1. */
static __always_inline long slot_of(struct xdp_md *ctx)
{
	__u32 ifindex = ctx->ingress_ifindex;
	if (ctx->rx_queue_index == 0 && ifindex < SLOT0_ENTRIES) {
		__u32 *s = bpf_map_lookup_elem(&slot0, &ifindex);
		return s && *s ? (long)*s - 1 : -1;
	}
	struct port_key key = { .ifindex = ifindex, .queue = ctx->rx_queue_index };
	__u32 *slot = bpf_map_lookup_elem(&port_slot, &key);
	return slot ? (long)*slot : -1;
}

static __always_inline int to_socket(struct xdp_md *ctx)
{
	long slot = slot_of(ctx);
	if (slot < 0)
		return drop(XDP_DROP_NO_SOCKET);
	/* An empty XSKMAP entry (the socket closed: stromd stopped) drops, uncounted. */
	return bpf_redirect_map(&xsks, (__u32)slot, XDP_DROP);
}

/* Whether two MACs are equal (no memcmp in BPF: clang would call it). */
static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

/* Whether the frame's source MAC is the pod's and `saddr` one of its addresses. */
static __always_inline int from_pod(struct xdp_md *ctx, struct ethhdr *eth, __u32 saddr)
{
	__u32 ifindex = ctx->ingress_ifindex;
	struct pod_src *src = bpf_map_lookup_elem(&pod_src, &ifindex);
	if (!src)
		return 0;
	if (!mac_eq(eth->h_source, src->mac))
		return 0;
#pragma unroll
	for (int i = 0; i < POD_SRC_IPS; i++)
		if (i < src->n_ips && src->ips[i] == saddr)
			return 1;
	return 0;
}

/* True when `daddr` may be one of the node's own addresses. */
static __always_inline int maybe_node_addr(__u32 daddr)
{
	__u32 zero = 0;
	struct v4_net *pods = bpf_map_lookup_elem(&pod_net, &zero);
	if (pods && pods->mask && (daddr & pods->mask) == pods->addr)
		return 0;
	return bpf_map_lookup_elem(&node_addrs, &daddr) != 0;
}

/* Whether `port` (network byte order) of IP protocol `proto` on the node's addresses is
 * stromd's: one of its SNAT ports, or a NodePort. */
static __always_inline int stromds_port(__u8 proto, __u16 port)
{
	__u32 zero = 0;
	struct port_range *r = bpf_map_lookup_elem(&snat_ports, &zero);
	__u16 host = bpf_ntohs(port);
	if (r && r->lo <= r->hi && host >= r->lo && host <= r->hi)
		return 1;
	struct l4_port key = { .port = port, .proto = proto, .pad = 0 };
	return bpf_map_lookup_elem(&node_ports, &key) != 0;
}

/* Whether a TCP, UDP or SCTP packet to one of the node's addresses is for stromd: to a
 * NodePort, or an answer to a port stromd translated to. From outside (`uplink`), a first
 * fragment is told by its ports like a whole datagram and recorded in `frag_ids`, and a
 * later one, which has none, goes where its first went; from a pod, fragments stay the
 * kernel's. */
static __always_inline int stromd_port(struct iphdr *ip, void *end, int uplink)
{
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_SCTP)
		return 0;
	int fragment = (ip->frag_off & bpf_htons(0x3fff)) != 0;
	if (fragment && !uplink)
		return 0;
	struct frag_key fk = {
		.saddr = ip->saddr, .daddr = ip->daddr, .id = ip->id, .proto = ip->protocol, .pad = 0
	};
	/* a later fragment: an offset */
	if (ip->frag_off & bpf_htons(0x1fff)) {
		__u64 *first = bpf_map_lookup_elem(&frag_ids, &fk);
		return first && bpf_ktime_get_ns() - *first < FRAG_NS;
	}
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return 0;
	__u8 *l4 = (void *)ip + ihl;
	if ((void *)(l4 + 4) > end)
		return 0;
	__u16 dport;
	__builtin_memcpy(&dport, l4 + 2, 2);
	if (!stromds_port(ip->protocol, dport))
		return 0;
	/* a first fragment: more to come */
	if (fragment) {
		__u64 now = bpf_ktime_get_ns();
		bpf_map_update_elem(&frag_ids, &fk, &now, BPF_ANY);
	}
	return 1;
}

/* The 8-byte ICMP header of an unfragmented ICMP packet, or 0. */
static __always_inline __u8 *icmp_header(struct iphdr *ip, void *end)
{
	if (ip->protocol != IPPROTO_ICMP || (ip->frag_off & bpf_htons(0x3fff)))
		return 0;
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return 0;
	__u8 *icmp = (void *)ip + ihl;
	if ((void *)(icmp + 8) > end)
		return 0;
	return icmp;
}

/* Whether an ICMP error to one of the node's addresses (destination unreachable, time
 * exceeded, parameter problem) quotes a packet that left from a port of stromd's: one
 * stromd translated (masquerade, SNAT, a NodePort's answer), which stromd translates back
 * (path MTU discovery for those flows). */
static __always_inline int stromd_icmp_error(struct iphdr *ip, void *end)
{
	__u8 *icmp = icmp_header(ip, end);
	if (!icmp)
		return 0;
	if (icmp[0] != 3 && icmp[0] != 11 && icmp[0] != 12)
		return 0;
	struct iphdr *q = (void *)(icmp + 8);
	if ((void *)(q + 1) > end)
		return 0;
	if (q->protocol != IPPROTO_TCP && q->protocol != IPPROTO_UDP && q->protocol != IPPROTO_SCTP)
		return 0;
	__u32 qihl = q->ihl * 4;
	if (qihl < sizeof(*q))
		return 0;
	__u8 *ql4 = (void *)q + qihl;
	if ((void *)(ql4 + 2) > end)
		return 0;
	__u16 sport;
	__builtin_memcpy(&sport, ql4, 2);
	return stromds_port(q->protocol, sport);
}

/* Whether a packet to one of the node's addresses is an ICMP echo reply to an identifier
 * stromd masqueraded a pod's ping to. */
static __always_inline int stromd_echo_reply(struct iphdr *ip, void *end)
{
	__u8 *icmp = icmp_header(ip, end);
	if (!icmp)
		return 0;
	if (icmp[0] != 0 || icmp[1] != 0)
		return 0;
	__u32 id = ((__u32)icmp[4] << 8) | icmp[5];
	__u32 word = id / 64;
	__u64 *bits = bpf_map_lookup_elem(&echo_ids, &word);
	return bits && ((*bits >> (id % 64)) & 1);
}

/* xdp.frags: a pod's veth may carry frames larger than a page (a pod MTU of 65000 toward the
 * pods of its node); the program reads only the headers, which lie in the first buffer, and
 * stromd's multi-buffer sockets take the rest as a chain. */
SEC("xdp.frags")
int strom_pod(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return to_socket(ctx); /* stromd counts the runt */

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return to_socket(ctx);
		if (maybe_node_addr(ip->daddr)) {
			/* a NodePort, or a backend's answer to a translated port: stromd's (it
			 * checks the source itself) */
			if (stromd_port(ip, end, 0) || stromd_icmp_error(ip, end))
				return to_socket(ctx);
			return from_pod(ctx, eth, ip->saddr) ? XDP_PASS : drop(XDP_DROP_SPOOFED);
		}
	} else if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		struct arp_ipv4 *arp = (void *)(eth + 1);
		if ((void *)(arp + 1) > end)
			return to_socket(ctx);
		__u32 zero = 0;
		__u32 *gw = bpf_map_lookup_elem(&gateway, &zero);
		__u32 tpa;
		__builtin_memcpy(&tpa, arp->tpa, 4);
		/* answers to the node's own ARP requests, probes of the node: kernel, from the
		 * pod's own MAC and address (an address probe's sender address is 0) */
		if (!gw || tpa != *gw) {
			__u32 spa;
			__builtin_memcpy(&spa, arp->spa, 4);
			if (!mac_eq(arp->sha, eth->h_source))
				return drop(XDP_DROP_SPOOFED);
			if (spa == 0) {
				__u32 ifindex = ctx->ingress_ifindex;
				struct pod_src *src = bpf_map_lookup_elem(&pod_src, &ifindex);
				if (!src || !mac_eq(eth->h_source, src->mac))
					return drop(XDP_DROP_SPOOFED);
				return XDP_PASS;
			}
			return from_pod(ctx, eth, spa) ? XDP_PASS : drop(XDP_DROP_SPOOFED);
		}
	}
	return to_socket(ctx);
}

SEC("xdp")
int strom_uplink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return XDP_PASS;
	struct lpm_v4 key = { .prefixlen = 32, .addr = ip->daddr };
	if (!bpf_map_lookup_elem(&owned, &key) &&
	    !(bpf_map_lookup_elem(&node_addrs, &ip->daddr) &&
	      (stromd_port(ip, end, 1) || stromd_icmp_error(ip, end) ||
	       stromd_echo_reply(ip, end))))
		return XDP_PASS;
	long slot = slot_of(ctx);
	if (slot < 0)
		return drop(XDP_DROP_NO_SOCKET);
	return bpf_redirect_map(&xsks, (__u32)slot, XDP_DROP);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
