/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * vdl-init: PID 1 of the test guest and its whole workload.
 *
 * 1. mounts /proc, /sys and /dev (devtmpfs), sends its output to the console;
 * 2. loads the kernel modules of /lib/vdl-modules (NN-name.ko, in file name
 *    order, which the initramfs builder made dependency order) with
 *    finit_module(2);
 * 3. waits for the virtio disk, then loops forever:
 *      - reads NBUF chunks of the patterned disk into NBUF fixed buffers with
 *        O_DIRECT, so every byte of those buffers is written by the
 *        vhost-user device (the backend process on the host), never by the
 *        guest CPU;
 *      - checks every 8-byte word against pattern.h;
 *      - prints one progress line per iteration and one line per mismatching
 *        page (capped).
 *    Buffer b holds disk chunk (b + iter * NBUF) mod NCHUNKS in iteration
 *    iter: the same buffers get different data on every iteration, so a page
 *    whose device write was not migrated still holds an older chunk on the
 *    destination and fails the check. All reads of an iteration happen before
 *    all checks, so any buffer filled on the migration source before the
 *    switch-over is checked on the destination after it.
 *
 * Kernel command line parameters (all optional):
 *   vdl.dev=/dev/vda     disk to read
 *   vdl.buf_mib=96       total buffer memory (MiB)
 *   vdl.chunk_kib=4096   size of one buffer / one O_DIRECT read (KiB)
 *   vdl.seed=HEX         pattern seed (must match the image)
 *   vdl.sleep_ms=0       pause after each iteration
 *   vdl.maxprint=16      mismatch lines printed per iteration at most
 *
 * Output lines (all start with "VDL "):
 *   VDL READY dev=... disk_bytes=... nbuf=... chunk_bytes=... seed=...
 *   VDL ITER n=N verified=BYTES mism_words=W mism_pages=P total_mism_words=T ms=MS
 *   VDL MISMATCH iter=N buf=B disk_off=0x... buf_off=0x... gpa=0x... exp=0x... got=0x... words_in_page=K
 *   VDL FATAL message      (the guest then powers off)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "pattern.h"

#define MODDIR "/lib/vdl-modules"
#define PAGE 4096UL

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
	say("VDL FATAL %s", msg);
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

static uint64_t param_u64(const char *key, uint64_t def, int base)
{
	const char *v = param(key);
	if (!v)
		return def;
	char *end;
	errno = 0;
	uint64_t x = strtoull(v, &end, base);
	if (errno || *end || end == v)
		fatal("bad value for %s: '%s'", key, v);
	return x;
}

/* ---- module loading ---- */

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static void load_modules(void)
{
	DIR *d = opendir(MODDIR);
	if (!d) {
		say("VDL no %s (%s): assuming a kernel with virtio built in", MODDIR,
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
	say("VDL loaded %d modules", n);
}

/* ---- guest physical address of a buffer page, for the mismatch report ---- */

static int pagemap_fd = -1;

static uint64_t gpa_of(const void *va)
{
	if (pagemap_fd < 0)
		return UINT64_MAX;
	uint64_t ent;
	off_t off = (off_t)((uintptr_t)va / PAGE) * 8;
	if (pread(pagemap_fd, &ent, 8, off) != 8)
		return UINT64_MAX;
	if (!(ent & (1ULL << 63)))
		return UINT64_MAX;
	uint64_t pfn = ent & ((1ULL << 55) - 1);
	return pfn * PAGE + ((uintptr_t)va % PAGE);
}

/* ---- I/O and checking ---- */

static void read_full(int fd, void *buf, size_t len, uint64_t off)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fatal("read at 0x%" PRIx64 ": %s", off + done, strerror(errno));
		if (n == 0)
			fatal("short read at 0x%" PRIx64, off + done);
		done += (size_t)n;
	}
}

struct check_result {
	uint64_t words;
	uint64_t pages;
};

static struct check_result check_chunk(const uint64_t *buf, size_t len, uint64_t disk_off,
				       uint64_t seed, uint64_t iter, unsigned b,
				       unsigned *printed, unsigned maxprint)
{
	struct check_result r = {0, 0};
	const size_t words_per_page = PAGE / 8;
	for (size_t pg = 0; pg < len / PAGE; pg++) {
		const uint64_t *w = buf + pg * words_per_page;
		uint64_t base = disk_off + pg * PAGE;
		uint64_t bad = 0;
		size_t first = 0;
		for (size_t i = 0; i < words_per_page; i++) {
			if (w[i] != vdl_pattern_word(base + i * 8, seed)) {
				if (!bad)
					first = i;
				bad++;
			}
		}
		if (!bad)
			continue;
		r.words += bad;
		r.pages++;
		if (*printed < maxprint) {
			(*printed)++;
			say("VDL MISMATCH iter=%" PRIu64 " buf=%u disk_off=0x%" PRIx64
			    " buf_off=0x%zx gpa=0x%" PRIx64 " exp=0x%016" PRIx64
			    " got=0x%016" PRIx64 " words_in_page=%" PRIu64,
			    iter, b, base + first * 8, pg * PAGE + first * 8, gpa_of(&w[first]),
			    vdl_pattern_word(base + first * 8, seed), w[first], bad);
		}
	}
	return r;
}

int main(void)
{
	/* The kernel gave us /dev/console from the initramfs as fds 0-2 (if it could). */
	mkdir("/proc", 0555);
	mkdir("/sys", 0555);
	mkdir("/dev", 0755);
	if (mount("proc", "/proc", "proc", 0, NULL) != 0)
		say("VDL mount /proc: %s", strerror(errno));
	if (mount("sysfs", "/sys", "sysfs", 0, NULL) != 0)
		say("VDL mount /sys: %s", strerror(errno));
	if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) != 0)
		say("VDL mount /dev: %s", strerror(errno));
	int c = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (c >= 0)
		out_fd = c;

	int cf = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	if (cf >= 0) {
		ssize_t n = read(cf, cmdline, sizeof(cmdline) - 1);
		if (n > 0)
			cmdline[n] = 0;
		close(cf);
	}

	const char *dev = param("vdl.dev");
	char devpath[128];
	snprintf(devpath, sizeof(devpath), "%s", dev ? dev : "/dev/vda");
	uint64_t buf_mib = param_u64("vdl.buf_mib", 96, 10);
	uint64_t chunk = param_u64("vdl.chunk_kib", 4096, 10) * 1024;
	uint64_t seed = param_u64("vdl.seed", VDL_DEFAULT_SEED, 16);
	uint64_t sleep_ms = param_u64("vdl.sleep_ms", 0, 10);
	unsigned maxprint = (unsigned)param_u64("vdl.maxprint", 16, 10);
	if (chunk == 0 || chunk % PAGE)
		fatal("vdl.chunk_kib must be a non-zero multiple of 4");

	load_modules();

	int fd = -1;
	uint64_t t0 = now_ms();
	while ((fd = open(devpath, O_RDONLY | O_DIRECT | O_CLOEXEC)) < 0) {
		if (now_ms() - t0 > 20000)
			fatal("no disk %s after 20 s: %s", devpath, strerror(errno));
		usleep(20000);
	}
	uint64_t disk_bytes = 0;
	if (ioctl(fd, BLKGETSIZE64, &disk_bytes) != 0)
		fatal("BLKGETSIZE64 %s: %s", devpath, strerror(errno));

	uint64_t nbuf = buf_mib * 1024 * 1024 / chunk;
	uint64_t nchunks = disk_bytes / chunk;
	if (nbuf == 0)
		fatal("buffer set smaller than one chunk");
	if (nchunks <= nbuf)
		fatal("disk too small: %" PRIu64 " chunks, need more than %" PRIu64, nchunks, nbuf);

	uint64_t **bufs = calloc(nbuf, sizeof(*bufs));
	if (!bufs)
		fatal("out of memory");
	for (uint64_t b = 0; b < nbuf; b++) {
		bufs[b] = mmap(NULL, chunk, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
		if (bufs[b] == MAP_FAILED)
			fatal("mmap buffer %" PRIu64 ": %s", b, strerror(errno));
		/* Poison, so the buffers are never zero pages and never look valid. */
		memset(bufs[b], 0xA5, chunk);
		mlock(bufs[b], chunk);
	}
	pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);

	say("VDL READY dev=%s disk_bytes=%" PRIu64 " nbuf=%" PRIu64 " chunk_bytes=%" PRIu64
	    " seed=0x%" PRIx64 " sleep_ms=%" PRIu64,
	    devpath, disk_bytes, nbuf, chunk, seed, sleep_ms);

	uint64_t total_mism = 0, total_verified = 0;
	for (uint64_t iter = 1;; iter++) {
		uint64_t start = now_ms();
		for (uint64_t b = 0; b < nbuf; b++) {
			uint64_t ch = (b + iter * nbuf) % nchunks;
			read_full(fd, bufs[b], chunk, ch * chunk);
		}
		uint64_t mism_words = 0, mism_pages = 0;
		unsigned printed = 0;
		for (uint64_t b = 0; b < nbuf; b++) {
			uint64_t ch = (b + iter * nbuf) % nchunks;
			struct check_result r = check_chunk(bufs[b], chunk, ch * chunk, seed,
							    iter, (unsigned)b, &printed, maxprint);
			mism_words += r.words;
			mism_pages += r.pages;
		}
		total_mism += mism_words;
		total_verified += nbuf * chunk;
		say("VDL ITER n=%" PRIu64 " verified=%" PRIu64 " mism_words=%" PRIu64
		    " mism_pages=%" PRIu64 " total_mism_words=%" PRIu64 " ms=%" PRIu64,
		    iter, nbuf * chunk, mism_words, mism_pages, total_mism, now_ms() - start);
		if (sleep_ms)
			usleep(sleep_ms * 1000);
	}
	(void)total_verified;
}
