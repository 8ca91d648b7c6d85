// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
// Services for the node's own sockets. Built by xdp/build.rs like strom.c and loaded by stromd
// (aya), attached to a cgroup v2 directory (the root by default).
//
// The node's own packets never cross an XDP program (they leave through the kernel's routes,
// and a NodePort on the node's own address is delivered locally), so stromd's pipeline cannot
// translate them. Instead the destination is chosen when the socket names it, as Cilium's
// socket load balancing does: connect(2) (TCP, connected UDP) and sendmsg(2) (unconnected UDP)
// to a Service frontend are given a backend's address; recvmsg(2) and getpeername(2) give the
// frontend back. No packet of such a connection is translated, so it needs no conntrack entry.
//   sock_connect4      connect(2)
//   sock_sendmsg4      sendmsg(2) on an unconnected UDP socket
//   sock_recvmsg4      the source of a UDP datagram: the frontend it was sent to
//   sock_getpeername4  the peer of a connected socket: the frontend it was connected to
// Only sockets of the node's network namespace (`node_netns`: its cookie; 0: none) are
// touched: pods have their own namespaces, and stromd's pipeline serves them.
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#define ECONNREFUSED 111

/* the cookie of the node's network namespace (key 0; 0: serve no socket) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} node_netns SEC(".maps");

/* A Service frontend: a ClusterIP, external or load-balancer IP, or a node address with a
 * NodePort. Addresses and ports in network byte order. */
struct front_key {
	__u32 ip;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

/* What a frontend leads to: `count` backends under `id` in `sock_backends` (0: reject).
 * stromd writes a changed frontend's backends under a new id before it points the frontend
 * at them, so a reader sees the old set or the new one whole. */
struct front {
	__u32 id;
	__u32 count;
	__u32 affinity_s; /* sessionAffinity ClientIP timeout; 0: none */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct front_key);
	__type(value, struct front);
} sock_fronts SEC(".maps");

struct backend_key {
	__u32 id;
	__u32 index;
};

struct backend {
	__u32 ip;
	__u16 port;
	__u16 pad;
};

/* (id, index) -> backend; and (id, backend) -> 1, to check that a remembered backend (ClientIP
 * affinity) still serves */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct backend_key);
	__type(value, struct backend);
} sock_backends SEC(".maps");

struct member_key {
	__u32 id;
	__u32 ip;
	__u16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct member_key);
	__type(value, __u8);
} sock_members SEC(".maps");

/* The node's ClientIP affinity per frontend: the node is one client. */
struct affinity {
	struct backend be;
	__u32 id;
	__u32 pad;
	__u64 expires_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct front_key);
	__type(value, struct affinity);
} sock_affinity SEC(".maps");

/* (socket, frontend) -> the backend it was given: an unconnected UDP socket's datagrams to a
 * frontend keep going to one backend while it serves, as a conntrack entry would keep them */
struct fwd_key {
	__u64 cookie;
	struct front_key front;
};

struct fwd {
	struct backend be;
	__u32 id;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct fwd_key);
	__type(value, struct fwd);
} sock_fwd SEC(".maps");

/* (socket, backend) -> the frontend the socket named, for recvmsg and getpeername */
struct rev_key {
	__u64 cookie;
	__u32 ip;
	__u16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct rev_key);
	__type(value, struct backend);
} sock_rev SEC(".maps");

static __always_inline int serves(struct front *f, struct backend *be, __u32 id)
{
	struct member_key m = { .id = f->id, .ip = be->ip, .port = be->port };
	return id == f->id || bpf_map_lookup_elem(&sock_members, &m);
}

static __always_inline int node_socket(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	__u64 *cookie = bpf_map_lookup_elem(&node_netns, &zero);
	return cookie && *cookie && *cookie == bpf_get_netns_cookie(ctx);
}

/* Picks a backend of `f` into `out`: the remembered one while affinity holds and it still
 * serves, else one at random (as kube-proxy's rules do). */
static __always_inline int pick(struct front_key *key, struct front *f, struct backend *out)
{
	__u64 now = 0;
	if (f->affinity_s) {
		now = bpf_ktime_get_ns();
		struct affinity *a = bpf_map_lookup_elem(&sock_affinity, key);
		if (a && a->expires_ns > now && serves(f, &a->be, a->id)) {
			*out = a->be;
			goto remember;
		}
	}
	struct backend_key k = { .id = f->id, .index = bpf_get_prandom_u32() % f->count };
	struct backend *be = bpf_map_lookup_elem(&sock_backends, &k);
	if (!be)
		return 0;
	*out = *be;
	if (!f->affinity_s)
		return 1;
	/* The first choice is made once: several connects of the node racing to the same frontend
	 * each picked at random, and the first to record its pick wins; the others take it. */
	struct affinity first = {
		.be = *out,
		.id = f->id,
		.expires_ns = now + (__u64)f->affinity_s * 1000000000ull,
	};
	if (bpf_map_update_elem(&sock_affinity, key, &first, BPF_NOEXIST) == 0)
		return 1;
	struct affinity *won = bpf_map_lookup_elem(&sock_affinity, key);
	if (won && won->expires_ns > now && serves(f, &won->be, won->id))
		*out = won->be;
remember:;
	struct affinity next = {
		.be = *out,
		.id = f->id,
		.expires_ns = now + (__u64)f->affinity_s * 1000000000ull,
	};
	bpf_map_update_elem(&sock_affinity, key, &next, BPF_ANY);
	return 1;
}

/* Names a backend instead of a frontend; 1: let the call go on, 0 with ECONNREFUSED: the
 * frontend has no backend (kube-proxy rejects those). */
static __always_inline int balance(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 1;
	if (!node_socket(ctx))
		return 1;
	struct front_key key = {
		.ip = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
		.proto = (__u8)ctx->protocol,
	};
	struct front *f = bpf_map_lookup_elem(&sock_fronts, &key);
	if (!f)
		return 1;
	if (!f->count) {
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct fwd_key fk = { .cookie = cookie, .front = key };
	/* a TCP socket connects once: only UDP sockets name a frontend again */
	int udp = ctx->protocol == IPPROTO_UDP;
	struct fwd *known = udp ? bpf_map_lookup_elem(&sock_fwd, &fk) : 0;
	struct backend be;
	if (known && serves(f, &known->be, known->id)) {
		be = known->be;
	} else {
		if (!pick(&key, f, &be)) {
			bpf_set_retval(-ECONNREFUSED);
			return 0;
		}
		if (udp) {
			struct fwd next = { .be = be, .id = f->id };
			bpf_map_update_elem(&sock_fwd, &fk, &next, BPF_ANY);
		}
	}
	struct rev_key rk = { .cookie = cookie, .ip = be.ip, .port = be.port };
	struct backend front = { .ip = key.ip, .port = key.port };
	bpf_map_update_elem(&sock_rev, &rk, &front, BPF_ANY);
	ctx->user_ip4 = be.ip;
	ctx->user_port = be.port;
	return 1;
}

/* Gives the frontend back where the kernel reports the backend. */
static __always_inline int unbalance(struct bpf_sock_addr *ctx)
{
	if (!node_socket(ctx))
		return 1;
	struct rev_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.ip = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
	};
	struct backend *front = bpf_map_lookup_elem(&sock_rev, &rk);
	if (front) {
		ctx->user_ip4 = front->ip;
		ctx->user_port = front->port;
	}
	return 1;
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return balance(ctx);
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return balance(ctx);
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return unbalance(ctx);
}

SEC("cgroup/getpeername4")
int sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return unbalance(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
