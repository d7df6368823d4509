/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
 *
 * Test frames of the network guest (net-init.c) and of tools/netpeer.py, which
 * implements the same layout and pattern in Python: keep the two in step.
 */
#ifndef VDL_NET_PATTERN_H
#define VDL_NET_PATTERN_H

#include <stddef.h>
#include <stdint.h>

/* IEEE 802 "Local Experimental EtherType 1" (IEEE Std 802, clause 9.2.4). */
#define VDL_NET_ETHERTYPE 0x88b5
#define VDL_NET_MAGIC "VDLN"
/* Ethernet header (14) + magic (4) + kind, flags (2) + frame_len (2) + seq,
 * guest_seq, crc (3 x 4): the body starts here. */
#define VDL_NET_HDR_LEN 34

enum {
	VDL_NET_ECHO_REQ = 1,
	VDL_NET_ECHO_REPLY = 2,
	VDL_NET_STREAM = 3,
	VDL_NET_STATS_REQ = 4,
	VDL_NET_STATS_REPLY = 5,
};

static inline uint16_t vdl_get_be16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static inline uint32_t vdl_get_be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline void vdl_put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

/* The body of frame seq is a window of a fixed pseudo-random table, at an
 * offset taken from seq, XORed with seq's low byte: a body left over from
 * another frame (a stale buffer) or shifted by a byte does not match, and
 * netpeer.py builds a body with one slice and one bytes.translate().
 *   table[j] = low byte of mix32(j), j < VDL_NET_TABLE_LEN
 *   offset(seq) = (seq * 0x9e3779b1 mod 2^32) >> 16           (0..65535)
 *   body[i] = table[offset(seq) + i] ^ (seq & 0xff)        (i < 2048)
 * netpeer.py: TABLE, pattern(). */
#define VDL_NET_TABLE_LEN (65536 + 2048)

static inline uint32_t vdl_net_mix32(uint32_t x)
{
	x *= 0x7feb352du;
	x ^= x >> 15;
	x *= 0x2c1b3c6du;
	x ^= x >> 12;
	return x;
}

static uint8_t vdl_net_table[VDL_NET_TABLE_LEN];

static inline void vdl_net_table_init(void)
{
	for (uint32_t j = 0; j < VDL_NET_TABLE_LEN; j++)
		vdl_net_table[j] = (uint8_t)vdl_net_mix32(j);
}

static inline int vdl_net_body_ok(const uint8_t *b, size_t len, uint32_t seq)
{
	if (len > 2048)
		return 0;
	const uint8_t *t = vdl_net_table + ((seq * 0x9e3779b1u) >> 16);
	uint8_t k = (uint8_t)seq;
	for (size_t i = 0; i < len; i++)
		if (b[i] != (uint8_t)(t[i] ^ k))
			return 0;
	return 1;
}

/* CRC-32 of IEEE 802.3 (reflected polynomial 0xedb88320, initial and final
 * value 0xffffffff), the one Python's zlib.crc32 computes. */
static inline uint32_t vdl_crc32(const uint8_t *p, size_t len)
{
	uint32_t crc = 0xffffffffu;
	for (size_t i = 0; i < len; i++) {
		crc ^= p[i];
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1)));
	}
	return ~crc;
}

#endif
