#!/usr/bin/env python3
# Writes the seed inputs in seeds/<target>/: one well-formed case per target, the way a Linux driver
# would lay it out, so the fuzzers start from inputs that reach the devices' deep paths and mutate
# from there. The layouts mirror the targets' input formats (queue.cc, blk.cc, mmio.cc).
# Run: python3 hypervisor/devices/virtio/fuzz/make-seeds.py
# seeds/*/regression-* are not made here: they are inputs the fuzzers once failed on, kept so every
# run replays them.
import os
import struct

here = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(here, 'seeds', target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), 'wb') as f:
        f.write(data)


def desc(addr, length, flags, nxt):
    return struct.pack('<QIHH', addr, length, flags, nxt)


NEXT, WRITE, INDIRECT = 1, 2, 4

# queue.cc: 8 config bytes (size, flags, start, avail slot, used slot, budget), then memory at
# 0x10000: descriptors at 0, avail ring at +0x1000, used ring at +0x1800, buffers from +0x2000.
base = 0x10000
mem = bytearray(0x1a00)
mem[0:48] = desc(base + 0x2000, 16, NEXT, 1) + desc(base + 0x2100, 512, NEXT | WRITE, 2) + desc(base + 0x2400, 1, WRITE, 0)
mem[48:64] = desc(base + 0x1900, 32, INDIRECT, 0)  # descriptor 3: an indirect table of two
mem[0x1900:0x1920] = desc(base + 0x2000, 16, NEXT, 1) + desc(base + 0x2200, 64, WRITE, 0)
mem[0x1000:0x1008] = struct.pack('<HHHH', 0, 2, 0, 3)
write('queue', 'linux-chains', struct.pack('<HBHBBB', 16, 3, 0, 0, 0, 8) + bytes(mem))

# blk.cc: mode (bit 0 read-only disk, bit 1 event idx, bit 2 no DISCARD), request count - 1, per
# request a shape byte (buffers - 1, 0x10 = indirect) and per buffer <u16 length, u8 writable>;
# then every buffer's bytes in order.
def blk(mode, requests):
    layout, contents = bytes([mode, len(requests) - 1]), b''
    for bufs, indirect in requests:
        layout += bytes([(len(bufs) - 1) | (0x10 if indirect else 0)])
        for data, writable in bufs:
            layout += struct.pack('<HB', len(data), 1 if writable else 0)
            contents += data
    return layout + contents


def header(type_, sector):
    return struct.pack('<IIQ', type_, 0, sector)


status = (b'\xff', True)
write('blk', 'write-read', blk(2, [([(header(1, 8), False), (b'skiff' * 100 + b'xxxxxxxxxxxx', False), status], False),
                                   ([(header(0, 8), False), (bytes(512), True), status], True)]))
write('blk', 'discard-zeroes', blk(2, [([(header(11, 0), False), (struct.pack('<QII', 8, 8, 0), False), status], False),
                                       ([(header(13, 0), False), (struct.pack('<QII', 16, 8, 1) * 2, False), status], False)]))
write('blk', 'flush-getid', blk(0, [([(header(4, 0), False), status], False), ([(header(8, 0), False), (bytes(20), True), status], False)]))

# mmio.cc: device byte (1 = blk), guest memory (half of the rest), then 7-byte accesses:
# op (bit 0 write, bits 1-3 width index 0 = 4 bytes, bit 7 process queue), u16 offset, u32 value.
def access(offset, value=0, write=True):
    return struct.pack('<BHI', 1 if write else 0, offset, value)


# Rings: a queue of 4 at 0x10000 (descriptors), 0x10040 (avail), 0x10080 (used); one IN request
# with its header at 0x10100, data at 0x10200 and status at 0x10400.
ops = b''
ops += access(0x70, 1) + access(0x70, 3)
ops += access(0x24, 0) + access(0x20, (1 << 28) | (1 << 29) | (1 << 9) | (1 << 13) | (1 << 14) | 0x44)
ops += access(0x24, 1) + access(0x20, 1) + access(0x70, 11) + access(0x70, 0, False)
ops += access(0x30, 0) + access(0x34, 0, False) + access(0x38, 4)
ops += access(0x80, 0x10000) + access(0x90, 0x10040) + access(0xa0, 0x10080) + access(0x44, 1)
ops += access(0x70, 15) + access(0x50, 0) + access(0x60, 0, False) + access(0x64, 1)
ops += struct.pack('<BHI', 0x80, 0, 0) + access(0x100, 0, False)
mem = bytearray(0x110)
mem[0:48] = desc(0x10100, 16, NEXT, 1) + desc(0x10200, 512, NEXT | WRITE, 2) + desc(0x10400, 1, WRITE, 0)
mem[0x40:0x46] = struct.pack('<HHH', 0, 1, 0)
mem[0x100:0x110] = struct.pack('<IIQ', 0, 0, 3)
# Memory is the first half of everything after the device byte: pad both halves to one length.
n = max(len(mem), len(ops))
ops = ops.ljust(n, b'\0')
write('mmio', 'linux-bring-up-blk', b'\x01' + bytes(mem).ljust(n, b'\0') + ops)

# vsock.cc: a script of steps, each a selector byte (0 packet, 1 rx buffers, 2 host write, 3 host
# connect, 4 event-loop turn, 5 driver takes used buffers) and its fields.
def packet(op, src_port, dst_port, payload=b'', flags=0, buf_alloc=65536, fwd_cnt=0, indirect=False):
    return (bytes([0, 1, 1, src_port, dst_port, 1, op, flags]) + struct.pack('<IIH', buf_alloc, fwd_cnt, len(payload))
            + bytes([1]) + payload + bytes([1 if indirect else 0]))


rx = bytes([1, 7]) + struct.pack('<H', 4096)
steps = rx + packet(1, 40, 1) + bytes([5]) + packet(5, 40, 1, b'hello') + bytes([2, 0, 3, 4, 5])
steps += bytes([3, 52, 5]) + rx + packet(6, 40, 1, fwd_cnt=5) + packet(4, 40, 1, flags=3) + bytes([4, 5])
write('vsock', 'connect-data-close', steps)

# net.cc: a features byte (bit 0 MRG_RXBUF, bit 1 EVENT_IDX, bit 2 INDIRECT_DESC), then steps: a
# selector byte (0 tx chain, 1 rx buffers, 2 backend frame, 3 rx processing, 4 driver takes used
# buffers, 5 raw descriptor, 6 reset and bring up) and its fields.
def net_tx(length, fill, split=False, indirect=False):
    return bytes([0, 1, 1, (1 if split else 0) | (2 if indirect else 0)]) + struct.pack('<H', length) + bytes([fill])


def net_rx(count, length, shape=0):
    return bytes([1, count - 1, shape]) + struct.pack('<H', length)


def net_frame(length, fill):
    return bytes([2, fill]) + struct.pack('<H', length)


steps = bytes([3]) + net_rx(4, 1536) + net_tx(60, 0x10) + net_tx(1514, 0x11, split=True) + net_frame(1514, 2) + bytes([3, 4])
steps += net_frame(4000, 4) + net_rx(4, 1536) + bytes([4]) + net_tx(42, 0x12, indirect=True) + bytes([4, 6, 2])
steps += net_rx(2, 1526) + net_frame(1514, 6) + net_frame(60, 8) + bytes([3, 4])
write('net', 'linux-mergeable-then-whole', steps)
