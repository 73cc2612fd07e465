// The doorbell test device: the smallest device that uses every piece of the machine's device
// plumbing (device_host.h) the way a virtio-mmio device will, so a test guest can check it from
// the inside: registers on the MMIO bus, a doorbell the guest rings from ring 3, a handler on the
// event loop that writes guest memory and raises an interrupt line. Attached only when a test
// asks for it (binding.cc `doorbellTest`, vmm-run --doorbell-test), in the last virtio-mmio slot.
//
// Registers (32-bit, at layout::virtioMmioSlot(layout::kDoorbellTestSlot)):
//   0x00 R   magic 0x42444b53 ("SKDB")
//   0x04 R   bit 0: the doorbell is the backend's (KVM ioeventfd); bit 1: so is the interrupt
//            line (KVM irqfd); clear: the VMM emulates it
//   0x08 RW  reply address, low 32 bits;  0x0c RW  high 32 bits
//   0x10 R   rings the event loop has seen
//   0x14 R   replies that could not be written (the reply address was not RAM)
//   0x50 W   the doorbell (any 32-bit value); not an exit when the backend carries it
// The kernel command line gets skiff.doorbell_test=0x200@0xd0000e00:23 (as virtio_mmio.device= would).
// On each ring the event loop writes the 64-bit count of rings seen at the reply address (if
// the 8 bytes lie in guest RAM), then triggers the interrupt line (layout::virtioIrq(slot)).
#pragma once
#include "vmm/device_host.h"

namespace skiff {

constexpr uint32_t kDoorbellTestMagic = 0x42444b53;
constexpr uint64_t kDoorbellTestRing = 0x50;

void attachDoorbellTest(DeviceHost& host);

}  // namespace skiff
