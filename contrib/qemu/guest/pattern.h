/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * The known data pattern of the test disk, shared by the host-side image
 * generator (mkdisk.c) and the guest workload (init.c).
 *
 * Every 8-byte little-endian word of the disk is a function of its own byte
 * offset on the disk and of a seed: a word that lands at the wrong place, a
 * page that still holds an older read, or a page of zeroes never matches.
 */
#ifndef VDL_PATTERN_H
#define VDL_PATTERN_H

#include <stdint.h>

/* Default seed; both sides can override it (mkdisk --seed, guest vdl.seed=). */
#define VDL_DEFAULT_SEED 0x56444C2D51454D55ULL /* "VDL-QEMU" */

/* splitmix64 finaliser over (offset ^ seed * golden ratio): a bijection of the
 * offset for a fixed seed, so no two words of the disk are equal. */
static inline uint64_t vdl_pattern_word(uint64_t byte_offset, uint64_t seed)
{
	uint64_t z = byte_offset ^ (seed * 0x9E3779B97F4A7C15ULL);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

#endif
