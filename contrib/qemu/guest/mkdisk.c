/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * mkdisk: write the raw test disk image with the known pattern of pattern.h.
 *
 *   mkdisk IMAGE SIZE_MIB [SEED_HEX]
 *
 * Writes to IMAGE.tmp and renames it into place, so a half-written image is
 * never mistaken for a finished one.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pattern.h"

#define MIB (1024ULL * 1024ULL)

int main(int argc, char **argv)
{
	if (argc < 3 || argc > 4) {
		fprintf(stderr, "usage: %s IMAGE SIZE_MIB [SEED_HEX]\n", argv[0]);
		return 2;
	}
	const char *path = argv[1];
	char *end;
	unsigned long long size_mib = strtoull(argv[2], &end, 10);
	if (*end || size_mib == 0 || size_mib > 65536) {
		fprintf(stderr, "mkdisk: bad size '%s' (MiB, 1..65536)\n", argv[2]);
		return 2;
	}
	uint64_t seed = VDL_DEFAULT_SEED;
	if (argc == 4) {
		seed = strtoull(argv[3], &end, 16);
		if (*end) {
			fprintf(stderr, "mkdisk: bad seed '%s' (hex)\n", argv[3]);
			return 2;
		}
	}

	char tmp[4096];
	if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp)) {
		fprintf(stderr, "mkdisk: path too long\n");
		return 2;
	}
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		fprintf(stderr, "mkdisk: open %s: %s\n", tmp, strerror(errno));
		return 1;
	}
	uint64_t *buf = malloc(MIB);
	if (!buf) {
		fprintf(stderr, "mkdisk: out of memory\n");
		return 1;
	}
	for (unsigned long long m = 0; m < size_mib; m++) {
		uint64_t base = m * MIB;
		for (size_t i = 0; i < MIB / 8; i++)
			buf[i] = vdl_pattern_word(base + i * 8, seed);
		size_t done = 0;
		while (done < MIB) {
			ssize_t n = pwrite(fd, (char *)buf + done, MIB - done, base + done);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				fprintf(stderr, "mkdisk: write %s: %s\n", tmp, strerror(errno));
				unlink(tmp);
				return 1;
			}
			done += (size_t)n;
		}
	}
	if (fsync(fd) != 0 || close(fd) != 0) {
		fprintf(stderr, "mkdisk: fsync/close %s: %s\n", tmp, strerror(errno));
		unlink(tmp);
		return 1;
	}
	if (rename(tmp, path) != 0) {
		fprintf(stderr, "mkdisk: rename %s -> %s: %s\n", tmp, path, strerror(errno));
		unlink(tmp);
		return 1;
	}
	free(buf);
	return 0;
}
