/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * vdl-net-init: PID 1 of the network test guest and its whole workload.
 *
 * 1. mounts /proc, /sys and /dev (devtmpfs), sends its output to the console;
 * 2. turns IPv6 off for new interfaces (no router solicitations, DAD or MLD
 *    frames on the wire), loads the kernel modules of /lib/vdl-modules
 *    (virtio_pci, failover, net_failover, virtio_net, in dependency order)
 *    with finit_module(2);
 * 3. waits for the virtio-net interface, enables every queue pair the device
 *    offers (ethtool ETHTOOL_SCHANNELS, "combined"), brings it up and
 *    promiscuous (SIOCSIFFLAGS), with no IP configuration at all;
 * 4. opens an AF_PACKET raw socket bound to that interface and to the test
 *    EtherType 0x88b5 (IEEE 802 "local experimental EtherType 1"), and loops:
 *    every test frame is checked, counted and, for an echo request, answered.
 *    With several queue pairs there is one worker process per queue pair
 *    (vdl.workers), pinned to CPU i, with its own socket in a PACKET_FANOUT_CPU
 *    group: virtio_net gives RX/TX queue pair i's interrupt to CPU i
 *    (virtnet_set_affinity) and maps CPU i to TX queue i (XPS), so a frame that
 *    arrives on RX queue i is answered by worker i on TX queue i, and every
 *    queue pair the device receives on also transmits. Counters are shared
 *    (atomic); answers from different workers may leave out of order.
 *
 * Test frame layout (all integers big-endian; offsets in the Ethernet frame):
 *    0  dst MAC           6  src MAC          12  EtherType 0x88b5
 *   14  magic "VDLN"     18  kind (u8)        19  flags (u8)
 *   20  frame_len (u16): the length the sender sent, header included
 *   22  seq (u32): the sender's sequence number
 *   26  guest_seq (u32): 0 in a request; in a reply, the guest's count of
 *       echo requests received so far, this one included
 *   30  crc (u32): 0 in a request; in a reply, the CRC-32 (IEEE 802.3, as
 *       zlib.crc32) of the body as the guest received it
 *   34  body: seq's window of the pattern table (net-pattern.h), up to frame_len
 * Kinds:
 *   1 echo request -> answered with kind 2: the request with the MACs
 *     swapped, flags bit 0 set if the guest found the body intact, guest_seq
 *     and crc filled in; same length;
 *   3 stream frame -> checked and counted, never answered. The flags byte
 *     names one of 16 streams (a host sending over several queue pairs uses
 *     one stream per pair, whose order the device keeps), guest_seq holds the
 *     stream's stride (0 = 1); per stream the guest expects seq = last +
 *     stride: a jump forward counts the missing frames as "gap", a number
 *     below that as "dup" (also what a stale RX buffer, still holding an
 *     older intact frame, looks like);
 *   4 stats query -> answered with kind 5 (MACs swapped, same length, at
 *     least 90 bytes) whose body holds seven u64 counters: rx, tx, bad, gap,
 *     dup, stream_rx, last stream seq (so a host can read the verdict of a
 *     stream without parsing the console).
 * A frame shorter than the header or without the magic counts as "other". A
 * frame whose frame_len is not its length or whose body does not match the
 * pattern counts as "bad" (and is still answered if it is an echo request,
 * with flags bit 0 clear, so the host sees the guest's verdict).
 *
 * Kernel command line parameters (all optional):
 *   vdl.if=NAME       interface (default: the first one that is not "lo")
 *   vdl.queues=N      queue pairs to enable (default 0: all the device offers)
 *   vdl.promisc=1     set IFF_PROMISC (default 1)
 *   vdl.report_ms=1000  interval of the progress line while counters change
 *   vdl.workers=N     responder processes (default: enabled queue pairs,
 *                     at most the online CPUs, at most 16)
 *
 * Console lines (all start with "vdl-net: "):
 *   vdl-net: ready if=eth0 ifindex=2 mac=52:54:00:12:34:56 queues=1/1 mtu=1500 workers=1
 *   vdl-net: rx N tx N bad B gap G dup D stream N other O txerr E [per-worker rx a/b/..]
 *            [queue rx a/b/.. queue tx c/d/..]   (the driver's own per-queue packet
 *            counts, ethtool -S rx_queue_N_packets / tx_queue_N_packets)
 *   vdl-net: BAD what=... seq=... len=... (the first 16 bad frames)
 *   vdl-net: FATAL message      (the guest then powers off)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/ethtool.h>
#include <linux/if_packet.h>
#include <linux/sockios.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "net-pattern.h"

#define MODDIR "/lib/vdl-modules"

static int out_fd = 2;

static void say(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	const char *p = line;
	while (n > 0) {
		ssize_t w = write(out_fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		p += w;
		n -= w;
	}
}

static void __attribute__((noreturn)) fatal(const char *fmt, ...)
{
	char msg[400];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	say("vdl-net: FATAL %s", msg);
	sync();
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* ---- kernel command line ---- */

static char cmdline[4096];

static const char *param(const char *key)
{
	size_t klen = strlen(key);
	for (char *p = cmdline; *p;) {
		while (*p == ' ' || *p == '\n')
			p++;
		if (!strncmp(p, key, klen) && p[klen] == '=') {
			static char val[256];
			size_t i = 0;
			p += klen + 1;
			while (p[i] && p[i] != ' ' && p[i] != '\n' && i < sizeof(val) - 1) {
				val[i] = p[i];
				i++;
			}
			val[i] = 0;
			return val;
		}
		while (*p && *p != ' ')
			p++;
	}
	return NULL;
}

static uint64_t param_u64(const char *key, uint64_t def)
{
	const char *v = param(key);
	if (!v)
		return def;
	char *end;
	errno = 0;
	uint64_t x = strtoull(v, &end, 10);
	if (errno || *end || end == v)
		fatal("bad value for %s: '%s'", key, v);
	return x;
}

/* ---- setup ---- */

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static void load_modules(void)
{
	DIR *d = opendir(MODDIR);
	if (!d) {
		say("vdl-net: no %s (%s): assuming a kernel with virtio built in", MODDIR,
		    strerror(errno));
		return;
	}
	char *names[64];
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)) && n < 64) {
		if (e->d_name[0] == '.')
			continue;
		names[n++] = strdup(e->d_name);
	}
	closedir(d);
	qsort(names, n, sizeof(names[0]), cmp_str);
	for (int i = 0; i < n; i++) {
		char path[512];
		snprintf(path, sizeof(path), "%s/%s", MODDIR, names[i]);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			fatal("open %s: %s", path, strerror(errno));
		if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
			fatal("finit_module %s: %s", path, strerror(errno));
		close(fd);
		free(names[i]);
	}
	say("vdl-net: loaded %d modules", n);
}

static void write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return; /* no IPv6 in this kernel: nothing to silence */
	if (write(fd, text, strlen(text)) < 0)
		say("vdl-net: write %s: %s", path, strerror(errno));
	close(fd);
}

/* The first interface in /sys/class/net that is not "lo", or vdl.if. */
static int find_interface(char *name, size_t len)
{
	const char *want = param("vdl.if");
	DIR *d = opendir("/sys/class/net");
	if (!d)
		return 0;
	struct dirent *e;
	int found = 0;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.' || !strcmp(e->d_name, "lo"))
			continue;
		if (want && strcmp(e->d_name, want))
			continue;
		if (strlen(e->d_name) >= len)
			continue;
		memcpy(name, e->d_name, strlen(e->d_name) + 1);
		found = 1;
		break;
	}
	closedir(d);
	return found;
}

static unsigned set_channels(int fd, const char *ifname, unsigned want, unsigned *max)
{
	struct ethtool_channels ch = {.cmd = ETHTOOL_GCHANNELS};
	struct ifreq ifr = {0};
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	ifr.ifr_data = (void *)&ch;
	if (ioctl(fd, SIOCETHTOOL, &ifr) != 0) {
		say("vdl-net: ETHTOOL_GCHANNELS %s: %s", ifname, strerror(errno));
		*max = 1;
		return 1;
	}
	*max = ch.max_combined;
	unsigned target = want ? want : ch.max_combined;
	if (target > ch.max_combined)
		fatal("vdl.queues=%u but the device offers %u queue pairs", target, ch.max_combined);
	if (target != ch.combined_count) {
		ch.cmd = ETHTOOL_SCHANNELS;
		ch.combined_count = target;
		if (ioctl(fd, SIOCETHTOOL, &ifr) != 0)
			fatal("ETHTOOL_SCHANNELS combined=%u on %s: %s", target, ifname,
			      strerror(errno));
	}
	return target;
}

/* ---- the responder ---- */

#define MAX_WORKERS 16

/* Shared by all workers (MAP_SHARED), updated with atomic adds. */
struct counters {
	uint64_t rx, tx, bad, gap, dup, stream_rx, other, txerr, echo;
	uint64_t last_stream_seq; /* the highest of all streams */
	uint64_t stream_last[16], stream_n[16]; /* per stream (flags byte) */
	uint64_t worker_rx[MAX_WORKERS];
	uint32_t bad_printed, stream_lock, joined;
};

static struct counters *c;
static unsigned worker; /* this process's worker index */

#define ADD(field, n) __atomic_add_fetch(&c->field, (n), __ATOMIC_RELAXED)

static void bad_frame(const char *what, uint32_t seq, size_t len)
{
	ADD(bad, 1);
	if (ADD(bad_printed, 1) <= 16)
		say("vdl-net: BAD what=%s seq=%" PRIu32 " len=%zu worker=%u", what, seq, len, worker);
}

static void put_be64(uint8_t *p, uint64_t v)
{
	for (int i = 7; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
}

static void send_frame(int s, const uint8_t *f, size_t len)
{
	for (;;) {
		ssize_t n = send(s, f, len, 0);
		if (n == (ssize_t)len) {
			ADD(tx, 1);
			return;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == ENOBUFS || errno == EAGAIN)) {
			/* TX ring full for a moment: wait for the device to complete some. */
			usleep(1000);
			continue;
		}
		if (ADD(txerr, 1) <= 16)
			say("vdl-net: send %zu bytes: %s", len, n < 0 ? strerror(errno) : "short");
		return;
	}
}

static void swap_macs(uint8_t *f, const uint8_t *mac)
{
	memcpy(f, f + 6, 6);
	memcpy(f + 6, mac, 6);
}

static void handle(int s, uint8_t *f, size_t len, const uint8_t *mac)
{
	if (len < VDL_NET_HDR_LEN || memcmp(f + 14, VDL_NET_MAGIC, 4)) {
		ADD(other, 1);
		return;
	}
	ADD(rx, 1);
	ADD(worker_rx[worker], 1);
	uint8_t kind = f[18];
	uint16_t flen = vdl_get_be16(f + 20);
	uint32_t seq = vdl_get_be32(f + 22);
	int ok = 1;
	if (flen != len) {
		bad_frame("frame_len", seq, len);
		ok = 0;
	} else if (!vdl_net_body_ok(f + VDL_NET_HDR_LEN, len - VDL_NET_HDR_LEN, seq)) {
		bad_frame("body", seq, len);
		ok = 0;
	}
	switch (kind) {
	case VDL_NET_ECHO_REQ:
		swap_macs(f, mac);
		f[18] = VDL_NET_ECHO_REPLY;
		f[19] = ok ? 1 : 0;
		vdl_put_be32(f + 26, (uint32_t)ADD(echo, 1));
		vdl_put_be32(f + 30, vdl_crc32(f + VDL_NET_HDR_LEN, len - VDL_NET_HDR_LEN));
		send_frame(s, f, len);
		break;
	case VDL_NET_STREAM:
		if (!ok)
			break;
		while (__atomic_exchange_n(&c->stream_lock, 1, __ATOMIC_ACQUIRE))
			;
		{
			unsigned id = f[19] & 15;
			uint64_t stride = vdl_get_be32(f + 26) ? vdl_get_be32(f + 26) : 1;
			if (c->stream_n[id] > 0) {
				uint64_t next = c->stream_last[id] + stride;
				if (seq > next)
					c->gap += (seq - next + stride - 1) / stride;
				else if (seq < next)
					c->dup++;
			}
			if (c->stream_n[id] == 0 || seq > c->stream_last[id])
				c->stream_last[id] = seq;
			c->stream_n[id]++;
			if (c->stream_rx == 0 || seq > c->last_stream_seq)
				c->last_stream_seq = seq;
			c->stream_rx++;
		}
		__atomic_store_n(&c->stream_lock, 0, __ATOMIC_RELEASE);
		break;
	case VDL_NET_STATS_REQ:
		if (len < VDL_NET_HDR_LEN + 7 * 8) {
			bad_frame("stats_len", seq, len);
			break;
		}
		swap_macs(f, mac);
		f[18] = VDL_NET_STATS_REPLY;
		f[19] = 1;
		uint8_t *b = f + VDL_NET_HDR_LEN;
		while (__atomic_exchange_n(&c->stream_lock, 1, __ATOMIC_ACQUIRE))
			;
		put_be64(b + 0, c->rx);
		put_be64(b + 8, c->tx + 1); /* this reply included */
		put_be64(b + 16, c->bad);
		put_be64(b + 24, c->gap);
		put_be64(b + 32, c->dup);
		put_be64(b + 40, c->stream_rx);
		put_be64(b + 48, c->last_stream_seq);
		__atomic_store_n(&c->stream_lock, 0, __ATOMIC_RELEASE);
		send_frame(s, f, len);
		break;
	default:
		bad_frame("kind", seq, len);
	}
}

static void queue_stats(char *buf, size_t len);

static void report(const struct counters *s, unsigned workers)
{
	char per[MAX_WORKERS * 21 + 32] = "";
	if (workers > 1) {
		size_t o = (size_t)snprintf(per, sizeof(per), " per-worker rx ");
		for (unsigned i = 0; i < workers && o < sizeof(per); i++)
			o += (size_t)snprintf(per + o, sizeof(per) - o, "%s%" PRIu64, i ? "/" : "",
					      s->worker_rx[i]);
	}
	char qs[2 * MAX_WORKERS * 21 + 32];
	queue_stats(qs, sizeof(qs));
	say("vdl-net: rx %" PRIu64 " tx %" PRIu64 " bad %" PRIu64 " gap %" PRIu64 " dup %" PRIu64
	    " stream %" PRIu64 " other %" PRIu64 " txerr %" PRIu64 "%s%s",
	    s->rx, s->tx, s->bad, s->gap, s->dup, s->stream_rx, s->other, s->txerr, per, qs);
}

/* ---- the driver's per-queue counters (ethtool -S) ---- */

static int stats_fd = -1;
static char stats_if[IFNAMSIZ];
static unsigned nstats;
static int rx_idx[MAX_WORKERS], tx_idx[MAX_WORKERS]; /* -1: not found */
static unsigned nqueues;

/* Finds virtio_net's "rx_queue_N_packets" / "tx_queue_N_packets" among the
 * ETH_SS_STATS strings (virtnet_get_strings). */
static void queue_stats_init(int fd, const char *ifname, unsigned queues)
{
	stats_fd = fd;
	snprintf(stats_if, sizeof(stats_if), "%s", ifname);
	nqueues = queues > MAX_WORKERS ? MAX_WORKERS : queues;
	for (unsigned q = 0; q < MAX_WORKERS; q++)
		rx_idx[q] = tx_idx[q] = -1;
	struct {
		struct ethtool_sset_info hdr;
		uint32_t len;
	} info = {.hdr = {.cmd = ETHTOOL_GSSET_INFO, .sset_mask = 1ULL << ETH_SS_STATS}};
	struct ifreq ifr = {0};
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	ifr.ifr_data = (void *)&info;
	if (ioctl(fd, SIOCETHTOOL, &ifr) != 0 || !info.hdr.sset_mask || info.len == 0 ||
	    info.len > 4096)
		return;
	nstats = info.len;
	struct ethtool_gstrings *gs = calloc(1, sizeof(*gs) + (size_t)nstats * ETH_GSTRING_LEN);
	if (!gs)
		return;
	gs->cmd = ETHTOOL_GSTRINGS;
	gs->string_set = ETH_SS_STATS;
	gs->len = nstats;
	ifr.ifr_data = (void *)gs;
	if (ioctl(fd, SIOCETHTOOL, &ifr) == 0) {
		for (unsigned i = 0; i < nstats; i++) {
			char name[ETH_GSTRING_LEN + 1];
			memcpy(name, gs->data + (size_t)i * ETH_GSTRING_LEN, ETH_GSTRING_LEN);
			name[ETH_GSTRING_LEN] = 0;
			unsigned q;
			char rest[ETH_GSTRING_LEN + 1];
			if (sscanf(name, "rx_queue_%u_%32s", &q, rest) == 2 && q < MAX_WORKERS &&
			    !strcmp(rest, "packets"))
				rx_idx[q] = (int)i;
			if (sscanf(name, "tx_queue_%u_%32s", &q, rest) == 2 && q < MAX_WORKERS &&
			    !strcmp(rest, "packets"))
				tx_idx[q] = (int)i;
		}
	}
	free(gs);
}

/* " queue rx a/b tx c/d" (packets per queue, from the driver), or "". */
static void queue_stats(char *buf, size_t len)
{
	buf[0] = 0;
	if (stats_fd < 0 || !nstats)
		return;
	struct ethtool_stats *st = calloc(1, sizeof(*st) + (size_t)nstats * sizeof(uint64_t));
	if (!st)
		return;
	st->cmd = ETHTOOL_GSTATS;
	st->n_stats = nstats;
	struct ifreq ifr = {0};
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", stats_if);
	ifr.ifr_data = (void *)st;
	if (ioctl(stats_fd, SIOCETHTOOL, &ifr) == 0) {
		size_t o = 0;
		for (int dir = 0; dir < 2; dir++) {
			const int *idx = dir ? tx_idx : rx_idx;
			o += (size_t)snprintf(buf + o, len - o, " queue %s ", dir ? "tx" : "rx");
			for (unsigned q = 0; q < nqueues && o < len; q++)
				o += (size_t)snprintf(buf + o, len - o, "%s%" PRIu64, q ? "/" : "",
						      idx[q] >= 0 ? (uint64_t)st->data[idx[q]] : 0);
			if (o >= len)
				break;
		}
	}
	free(st);
}

/* Worker loop: answers the frames of socket s; worker 0 also prints progress. */
static void __attribute__((noreturn)) serve(int s, const uint8_t *mac, unsigned workers,
					    uint64_t report_ms)
{
	static uint8_t frame[65536];
	struct counters shown = {0};
	uint64_t last_report = now_ms();
	for (;;) {
		struct pollfd pfd = {.fd = s, .events = POLLIN};
		int pr = poll(&pfd, 1, (int)(report_ms ? report_ms : 1000));
		if (pr < 0 && errno != EINTR)
			fatal("poll: %s", strerror(errno));
		if (pr > 0) {
			/* Drain what is queued, then report. */
			for (int i = 0; i < 256; i++) {
				ssize_t n = recv(s, frame, sizeof(frame), MSG_DONTWAIT);
				if (n < 0) {
					if (errno != EAGAIN && errno != EINTR)
						fatal("recv: %s", strerror(errno));
					break;
				}
				handle(s, frame, (size_t)n, mac);
			}
		}
		if (worker != 0)
			continue;
		uint64_t t = now_ms();
		struct counters now;
		memcpy(&now, c, sizeof(now));
		now.bad_printed = now.stream_lock = now.joined = 0;
		if (memcmp(&shown, &now, sizeof(now)) && t - last_report >= report_ms) {
			report(&now, workers);
			shown = now;
			last_report = t;
		}
	}
}

int main(void)
{
	mkdir("/proc", 0555);
	mkdir("/sys", 0555);
	mkdir("/dev", 0755);
	if (mount("proc", "/proc", "proc", 0, NULL) != 0)
		say("vdl-net: mount /proc: %s", strerror(errno));
	if (mount("sysfs", "/sys", "sysfs", 0, NULL) != 0)
		say("vdl-net: mount /sys: %s", strerror(errno));
	if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) != 0)
		say("vdl-net: mount /dev: %s", strerror(errno));
	int con = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (con >= 0)
		out_fd = con;

	int cf = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	if (cf >= 0) {
		ssize_t n = read(cf, cmdline, sizeof(cmdline) - 1);
		if (n > 0)
			cmdline[n] = 0;
		close(cf);
	}
	unsigned want_queues = (unsigned)param_u64("vdl.queues", 0);
	int promisc = (int)param_u64("vdl.promisc", 1);
	uint64_t report_ms = param_u64("vdl.report_ms", 1000);

	/* Before the interface exists, so it never starts IPv6 (no RS/DAD/MLD frames). */
	vdl_net_table_init();
	write_file("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
	write_file("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1");
	load_modules();

	char ifname[IFNAMSIZ];
	uint64_t t0 = now_ms();
	while (!find_interface(ifname, sizeof(ifname))) {
		if (now_ms() - t0 > 20000)
			fatal("no network interface%s%s after 20 s", param("vdl.if") ? " " : "",
			      param("vdl.if") ? param("vdl.if") : "");
		usleep(20000);
	}

	int ctl = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (ctl < 0)
		ctl = socket(AF_PACKET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (ctl < 0)
		fatal("control socket: %s", strerror(errno));
	unsigned max_queues = 1;
	unsigned queues = set_channels(ctl, ifname, want_queues, &max_queues);
	queue_stats_init(ctl, ifname, queues);

	struct ifreq ifr = {0};
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	if (ioctl(ctl, SIOCGIFFLAGS, &ifr) != 0)
		fatal("SIOCGIFFLAGS %s: %s", ifname, strerror(errno));
	ifr.ifr_flags |= IFF_UP | (promisc ? IFF_PROMISC : 0);
	if (ioctl(ctl, SIOCSIFFLAGS, &ifr) != 0)
		fatal("SIOCSIFFLAGS %s up: %s", ifname, strerror(errno));
	if (ioctl(ctl, SIOCGIFHWADDR, &ifr) != 0)
		fatal("SIOCGIFHWADDR %s: %s", ifname, strerror(errno));
	uint8_t mac[6];
	memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
	if (ioctl(ctl, SIOCGIFMTU, &ifr) != 0)
		fatal("SIOCGIFMTU %s: %s", ifname, strerror(errno));
	int mtu = ifr.ifr_mtu;
	if (ioctl(ctl, SIOCGIFINDEX, &ifr) != 0)
		fatal("SIOCGIFINDEX %s: %s", ifname, strerror(errno));
	int ifindex = ifr.ifr_ifindex;

	c = mmap(NULL, sizeof(*c), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (c == MAP_FAILED)
		fatal("mmap counters: %s", strerror(errno));
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	unsigned workers = queues;
	if (ncpu > 0 && workers > (unsigned)ncpu)
		workers = (unsigned)ncpu;
	workers = (unsigned)param_u64("vdl.workers", workers);
	if (workers < 1 || workers > MAX_WORKERS)
		fatal("vdl.workers must be 1..%d", MAX_WORKERS);

	/* All sockets join the fanout group in worker order before any frame
	 * arrives: PACKET_FANOUT_CPU picks member (cpu % members) in join order. */
	int socks[MAX_WORKERS];
	for (unsigned w = 0; w < workers; w++) {
		int s = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(VDL_NET_ETHERTYPE));
		if (s < 0)
			fatal("AF_PACKET socket: %s", strerror(errno));
		struct sockaddr_ll sll = {
			.sll_family = AF_PACKET,
			.sll_protocol = htons(VDL_NET_ETHERTYPE),
			.sll_ifindex = ifindex,
		};
		if (bind(s, (struct sockaddr *)&sll, sizeof(sll)) != 0)
			fatal("bind AF_PACKET to %s: %s", ifname, strerror(errno));
		int rcvbuf = 4 << 20;
		setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf));
		if (workers > 1) {
			int fanout = 0x5644 | (PACKET_FANOUT_CPU << 16);
			if (setsockopt(s, SOL_PACKET, PACKET_FANOUT, &fanout, sizeof(fanout)) != 0)
				fatal("PACKET_FANOUT: %s", strerror(errno));
		}
		socks[w] = s;
	}

	/* Wait for the carrier (VIRTIO_NET_S_LINK_UP, or always up without STATUS). */
	char carrier_path[64 + IFNAMSIZ];
	snprintf(carrier_path, sizeof(carrier_path), "/sys/class/net/%s/carrier", ifname);
	t0 = now_ms();
	for (;;) {
		char v = '0';
		int fd = open(carrier_path, O_RDONLY | O_CLOEXEC);
		if (fd >= 0) {
			if (read(fd, &v, 1) != 1)
				v = '0';
			close(fd);
		}
		if (v == '1')
			break;
		if (now_ms() - t0 > 20000)
			fatal("%s: no carrier after 20 s", ifname);
		usleep(20000);
	}

	for (unsigned w = 1; w < workers; w++) {
		pid_t pid = fork();
		if (pid < 0)
			fatal("fork: %s", strerror(errno));
		if (pid == 0) {
			worker = w;
			break;
		}
	}
	if (workers > 1) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(ncpu > 0 ? worker % (unsigned)ncpu : 0, &set);
		if (sched_setaffinity(0, sizeof(set), &set) != 0)
			say("vdl-net: worker %u: sched_setaffinity: %s", worker, strerror(errno));
	}
	ADD(joined, 1);
	if (worker != 0)
		serve(socks[worker], mac, workers, report_ms);
	/* "ready" once every worker runs on its CPU */
	while (__atomic_load_n(&c->joined, __ATOMIC_ACQUIRE) < workers)
		usleep(1000);

	say("vdl-net: ready if=%s ifindex=%d mac=%02x:%02x:%02x:%02x:%02x:%02x queues=%u/%u mtu=%d workers=%u",
	    ifname, ifindex, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], queues, max_queues,
	    mtu, workers);
	serve(socks[worker], mac, workers, report_ms);
}
