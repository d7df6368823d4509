/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * libvdl-dropmarks.so: LD_PRELOAD shim that makes a vhost-user backend lose
 * every dirty-log mark, for the negative control of run-e2e.sh with a backend
 * that has no switch of its own (qemu-storage-daemon).
 *
 * It watches the vhost-user messages the backend receives (recvmsg): the file
 * descriptor that arrives with VHOST_USER_SET_LOG_BASE (request 6) is the
 * frontend's shared log. When the backend maps that fd, it gets a private
 * anonymous mapping instead: its marks land in memory QEMU never sees, exactly
 * as if the backend never marked. Everything else is untouched.
 *
 * Only for tests. Build: gcc -shared -fPIC -O2 -o libvdl-dropmarks.so dropmarks.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#define VHOST_USER_SET_LOG_BASE 6
#define MAX_FDS 1024

static volatile unsigned char log_fd[MAX_FDS];

static ssize_t (*real_recvmsg)(int, struct msghdr *, int);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);

static void note(const char *msg, long a, long b)
{
	char line[200];
	int n = snprintf(line, sizeof(line), "vdl-dropmarks[%d]: %s %ld %ld\n", getpid(), msg, a, b);
	if (n > 0)
		(void)!write(2, line, (size_t)n);
}

ssize_t recvmsg(int sock, struct msghdr *msg, int flags)
{
	if (!real_recvmsg)
		real_recvmsg = (ssize_t(*)(int, struct msghdr *, int))dlsym(RTLD_NEXT, "recvmsg");
	ssize_t n = real_recvmsg(sock, msg, flags);
	if (n < 4 || !msg || msg->msg_iovlen < 1 || msg->msg_iov[0].iov_len < 4 || !msg->msg_controllen)
		return n;
	uint32_t request;
	memcpy(&request, msg->msg_iov[0].iov_base, 4);
	if (request != VHOST_USER_SET_LOG_BASE)
		return n;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		int *fds = (int *)CMSG_DATA(c);
		for (size_t i = 0; i < nfds; i++) {
			if (fds[i] >= 0 && fds[i] < MAX_FDS) {
				log_fd[fds[i]] = 1;
				note("SET_LOG_BASE fd", fds[i], 0);
			}
		}
	}
	return n;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	if (!real_mmap)
		real_mmap = (void *(*)(void *, size_t, int, int, int, off_t))dlsym(RTLD_NEXT, "mmap");
	if (fd >= 0 && fd < MAX_FDS && log_fd[fd]) {
		log_fd[fd] = 0; /* fd numbers get reused */
		note("dropping every mark: log mapping replaced, bytes/offset", (long)len, (long)off);
		return real_mmap(addr, len, prot, (flags & ~(MAP_SHARED | MAP_SHARED_VALIDATE)) | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	}
	return real_mmap(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return mmap(addr, len, prot, flags, fd, off);
}
