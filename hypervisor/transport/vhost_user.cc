#include "transport/vhost_user.h"

#include "common/hex.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace skiff {
namespace vhost_user {
namespace {


const char* requestName(uint32_t r) {
  switch (r) {
    case kGetFeatures: return "GET_FEATURES";
    case kSetFeatures: return "SET_FEATURES";
    case kSetOwner: return "SET_OWNER";
    case kResetOwner: return "RESET_OWNER";
    case kSetMemTable: return "SET_MEM_TABLE";
    case kSetLogBase: return "SET_LOG_BASE";
    case kSetLogFd: return "SET_LOG_FD";
    case kSetVringNum: return "SET_VRING_NUM";
    case kSetVringAddr: return "SET_VRING_ADDR";
    case kSetVringBase: return "SET_VRING_BASE";
    case kGetVringBase: return "GET_VRING_BASE";
    case kSetVringKick: return "SET_VRING_KICK";
    case kSetVringCall: return "SET_VRING_CALL";
    case kSetVringErr: return "SET_VRING_ERR";
    case kGetProtocolFeatures: return "GET_PROTOCOL_FEATURES";
    case kSetProtocolFeatures: return "SET_PROTOCOL_FEATURES";
    case kGetQueueNum: return "GET_QUEUE_NUM";
    case kSetVringEnable: return "SET_VRING_ENABLE";
    case kGetConfig: return "GET_CONFIG";
    case kSetConfig: return "SET_CONFIG";
    case kResetDevice: return "RESET_DEVICE";
  }
  return nullptr;
}

std::string describe(uint32_t r) {
  const char* n = requestName(r);
  return n ? n : "request " + std::to_string(r);
}

void appendReply(std::string& out, uint32_t request, const void* payload, uint32_t size) {
  Header h{request, kVersion | kFlagReply, size};
  out.append(reinterpret_cast<const char*>(&h), sizeof h);
  out.append(static_cast<const char*>(payload), size);
}

void appendU64(std::string& out, uint32_t request, uint64_t value) { appendReply(out, request, &value, 8); }

// The only fds skiff reads from or writes to for notifications are eventfds: a pipe, socket or
// file in their place could block the loop or be readable forever.
bool isEventfd(int fd) {
  char link[64];
  char target[64];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, target, sizeof target - 1);
  if (n < 0) return false;
  target[n] = '\0';
  return std::strcmp(target, "anon_inode:[eventfd]") == 0;
}

bool powerOfTwo(uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace

Backend::Backend(virtio::Device& device, Notifier& notifier, std::string name, Log log)
    : device_(device), notifier_(notifier), name_(std::move(name)), log_(std::move(log)), rings_(device.queueCount()) {
  // The front-end, not the device, picks ring sizes: QEMU's virtio-mmio offers the guest up to
  // 1024 whatever the device model says, so every split-ring size is accepted here.
  for (uint16_t i = 0; i < device_.queueCount(); ++i) queues_.emplace_back(virtio::Queue::kMaxSize);
}

Backend::~Backend() { disconnect(); }

bool Backend::handle(const Header& header, const uint8_t* payload, std::vector<int>& fds, std::string& reply, std::string& error) {
  bool ok = dispatch(header, payload, fds, reply, error);
  for (int fd : fds) {
    if (fd >= 0) ::close(fd);
  }
  fds.clear();
  if (!ok && error.empty()) error = describe(header.request) + " refused";
  return ok;
}

bool Backend::dispatch(const Header& h, const uint8_t* p, std::vector<int>& fds, std::string& reply, std::string& error) {
  const std::string what = describe(h.request);
  if ((h.flags & kVersionMask) != kVersion) {
    error = what + ": protocol version " + std::to_string(h.flags & kVersionMask) + ", only 1 is spoken";
    return false;
  }
  if (h.flags & ~(kVersionMask | kFlagNeedReply)) {
    error = what + ": flags " + hex(h.flags) + " have reserved or reply bits set";
    return false;
  }
  if (h.size > kMaxPayload) {
    error = what + ": payload of " + std::to_string(h.size) + " bytes (the most any request needs is " + std::to_string(kMaxPayload) + ")";
    return false;
  }
  auto sizeIs = [&](uint32_t want) {
    if (h.size == want) return true;
    error = what + ": payload is " + std::to_string(h.size) + " bytes, expected " + std::to_string(want);
    return false;
  };
  auto fdsAre = [&](size_t want) {
    if (fds.size() == want) return true;
    error = what + ": carries " + std::to_string(fds.size()) + " fds, expected " + std::to_string(want);
    return false;
  };
  auto ringIndex = [&](uint32_t index) {
    if (index < rings_.size()) return true;
    error = what + ": queue " + std::to_string(index) + " does not exist (the device has " + std::to_string(rings_.size()) + ")";
    return false;
  };
  uint64_t u64 = 0;
  uint32_t index = 0, num = 0;  // vhost_vring_state
  if (h.size >= 8) {
    std::memcpy(&u64, p, 8);
    std::memcpy(&index, p, 4);
    std::memcpy(&num, p + 4, 4);
  }
  const bool ack = (h.flags & kFlagNeedReply) && (protocolFeatures_ & kPReplyAck);

  // Requests with a reply of their own.
  switch (h.request) {
    case kGetFeatures:
      if (!sizeIs(0) || !fdsAre(0)) return false;
      appendU64(reply, h.request, device_.features() | kFProtocolFeatures);
      return true;
    case kGetProtocolFeatures:
      if (!sizeIs(0) || !fdsAre(0)) return false;
      appendU64(reply, h.request, offeredProtocolFeatures());
      return true;
    case kGetQueueNum:
      if (!sizeIs(0) || !fdsAre(0)) return false;
      appendU64(reply, h.request, device_.queueCount());
      return true;
    case kGetVringBase: {
      if (!sizeIs(8) || !fdsAre(0) || !ringIndex(index)) return false;
      stopRing(static_cast<uint16_t>(index));
      uint32_t state[2] = {index, rings_[index].base};
      appendReply(reply, h.request, state, sizeof state);
      return true;
    }
    case kGetConfig: {
      if (h.size < kConfigHeaderSize || !fdsAre(0)) {
        if (error.empty()) error = what + ": payload of " + std::to_string(h.size) + " bytes is shorter than its header";
        return false;
      }
      uint32_t cfg[3];
      std::memcpy(cfg, p, sizeof cfg);
      uint32_t offset = cfg[0], size = cfg[1];
      if (size > kMaxConfigSize || offset > kMaxConfigSize - size || h.size != kConfigHeaderSize + size) {
        error = what + ": offset " + std::to_string(offset) + " size " + std::to_string(size) + " in a payload of " + std::to_string(h.size) + " bytes";
        return false;
      }
      std::string out(reinterpret_cast<const char*>(cfg), sizeof cfg);
      std::string data(size, '\0');
      uint32_t have = device_.configSize();
      // Bytes past the device's config space read as zeros (QEMU may ask for a newer, longer struct).
      if (offset < have) {
        uint32_t n = size < have - offset ? size : have - offset;
        device_.readConfig(offset, reinterpret_cast<uint8_t*>(&data[0]), n);
      }
      out += data;
      appendReply(reply, h.request, out.data(), static_cast<uint32_t>(out.size()));
      return true;
    }
    default: break;
  }

  bool ok = false;
  switch (h.request) {
    case kSetFeatures: {
      if (!sizeIs(8) || !fdsAre(0)) break;
      uint64_t offered = device_.features() | kFProtocolFeatures;
      if (u64 & ~offered) {
        error = what + ": feature bits " + hex(u64 & ~offered) + " were not offered";
        break;
      }
      if (!(u64 & virtio::kFVersion1)) {
        error = what + ": the driver did not accept VIRTIO_F_VERSION_1 (a legacy transport? QEMU needs -global virtio-mmio.force-legacy=false)";
        break;
      }
      uint64_t features = u64 & ~kFProtocolFeatures;
      if (featuresSet_ && features != features_) stopDevice();
      features_ = features;
      featuresSet_ = true;
      if (u64 & kFProtocolFeatures) protocolNegotiated_ = true;
      ok = reconcile(error);
      break;
    }
    case kSetOwner:
    case kResetOwner:
    case kResetDevice:
      if (!sizeIs(0) || !fdsAre(0)) break;
      // SET_OWNER only marks the session's start; the resets drop the device's state.
      if (h.request != kSetOwner) resetState();
      ok = true;
      break;
    case kSetMemTable:
      ok = setMemTable(p, h.size, fds, error);
      if (ok) ok = reconcile(error);
      break;
    case kSetVringNum:
      if (!sizeIs(8) || !fdsAre(0) || !ringIndex(index)) break;
      if (!powerOfTwo(num) || num > virtio::Queue::kMaxSize) {
        error = what + ": queue " + std::to_string(index) + " size " + std::to_string(num) + " (a power of two up to " +
                std::to_string(virtio::Queue::kMaxSize) + ")";
        break;
      }
      if (rings_[index].started) {
        error = what + ": queue " + std::to_string(index) + " is running";
        break;
      }
      rings_[index].num = static_cast<uint16_t>(num);
      ok = true;
      break;
    case kSetVringAddr: {
      if (!sizeIs(sizeof(VringAddrMsg)) || !fdsAre(0)) break;
      VringAddrMsg a;
      std::memcpy(&a, p, sizeof a);
      if (!ringIndex(a.index)) break;
      if (a.flags & ~1u) {  // bit 0: VHOST_VRING_F_LOG (dirty logging; the address is ignored)
        error = what + ": flags " + hex(a.flags);
        break;
      }
      if (rings_[a.index].started) {
        error = what + ": queue " + std::to_string(a.index) + " is running";
        break;
      }
      Ring& r = rings_[a.index];
      r.descUser = a.desc;
      r.usedUser = a.used;
      r.availUser = a.avail;
      r.addrSet = true;
      ok = true;
      break;
    }
    case kSetVringBase:
      if (!sizeIs(8) || !fdsAre(0) || !ringIndex(index)) break;
      if (num > 0xffff) {
        error = what + ": base " + std::to_string(num) + " is not a split-ring index";
        break;
      }
      if (rings_[index].started) {
        error = what + ": queue " + std::to_string(index) + " is running";
        break;
      }
      rings_[index].base = static_cast<uint16_t>(num);
      ok = true;
      break;
    case kSetVringKick:
    case kSetVringCall:
    case kSetVringErr:
      if (!sizeIs(8)) break;
      ok = setVringFd(h.request, u64, fds, error);
      break;
    case kSetProtocolFeatures:
      if (!sizeIs(8) || !fdsAre(0)) break;
      if (u64 & ~offeredProtocolFeatures()) {
        error = what + ": protocol feature bits " + hex(u64 & ~offeredProtocolFeatures()) + " were not offered";
        break;
      }
      protocolFeatures_ = u64;
      protocolNegotiated_ = true;
      ok = true;
      break;
    case kSetVringEnable:
      if (!sizeIs(8) || !fdsAre(0) || !ringIndex(index)) break;
      if (num > 1) {
        error = what + ": enable must be 0 or 1, got " + std::to_string(num);
        break;
      }
      if (!protocolNegotiated_) {
        error = what + ": protocol features were not negotiated";
        break;
      }
      if (num == 0 && rings_[index].enabled && active_ && queues_[index].ready()) stopDevice();
      rings_[index].enabled = num == 1;
      ok = reconcile(error);
      if (ok && num == 1) process(static_cast<uint16_t>(index));
      break;
    case kSetConfig: {
      if (h.size < kConfigHeaderSize || !fdsAre(0)) {
        if (error.empty()) error = what + ": payload of " + std::to_string(h.size) + " bytes is shorter than its header";
        break;
      }
      uint32_t cfg[3];
      std::memcpy(cfg, p, sizeof cfg);
      uint32_t offset = cfg[0], size = cfg[1], flags = cfg[2];
      if (size > kMaxConfigSize || offset > kMaxConfigSize - size || h.size != kConfigHeaderSize + size || flags > 1) {
        error = what + ": offset " + std::to_string(offset) + " size " + std::to_string(size) + " flags " + std::to_string(flags) + " in a payload of " +
                std::to_string(h.size) + " bytes";
        break;
      }
      uint32_t have = device_.configSize();
      // Only whole writes inside the config space reach the device; the rest is ignored, as a
      // virtio-mmio write past the config space is.
      if (offset <= have && size <= have - offset && size > 0) device_.writeConfig(offset, p + kConfigHeaderSize, size);
      ok = true;
      break;
    }
    default:
      error = what + " is not supported by this back-end";
      break;
  }
  if (ack) appendU64(reply, h.request, ok ? 0 : 1);
  return ok;
}

uint64_t Backend::offeredProtocolFeatures() const {
  // CONFIG only for a device whose config space QEMU reads from the back-end: it warns about it
  // for one without (rng), and for net, whose config space (MAC, status, MTU) it keeps itself.
  bool config = device_.configSize() != 0 && device_.type() != virtio::kNet;
  return kOfferedProtocolFeatures & ~(config ? 0 : kPConfig);
}

bool Backend::setMemTable(const uint8_t* p, uint32_t size, std::vector<int>& fds, std::string& error) {
  if (size < 8) {
    error = "SET_MEM_TABLE: payload of " + std::to_string(size) + " bytes";
    return false;
  }
  uint32_t n;
  std::memcpy(&n, p, 4);
  if (n == 0 || n > kMaxRegions) {
    error = "SET_MEM_TABLE: " + std::to_string(n) + " regions (1 to " + std::to_string(kMaxRegions) + ")";
    return false;
  }
  if (size != 8 + n * sizeof(MemoryRegionMsg)) {
    error = "SET_MEM_TABLE: payload of " + std::to_string(size) + " bytes for " + std::to_string(n) + " regions";
    return false;
  }
  if (fds.size() != n) {
    error = "SET_MEM_TABLE: " + std::to_string(fds.size()) + " fds for " + std::to_string(n) + " regions";
    return false;
  }
  std::vector<Mapping> maps;
  virtio::MemoryMap memory;
  auto undo = [&]() {
    for (auto& m : maps) munmap(m.base, m.length);
  };
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  for (uint32_t i = 0; i < n; ++i) {
    MemoryRegionMsg r;
    std::memcpy(&r, p + 8 + i * sizeof r, sizeof r);
    const std::string where = "SET_MEM_TABLE: region " + std::to_string(i) + " (guest " + hex(r.guestAddr) + ", " + hex(r.size) + " bytes)";
    if (r.size == 0 || r.size > UINT64_MAX - r.guestAddr || r.size > UINT64_MAX - r.userAddr || r.size > UINT64_MAX - r.mmapOffset ||
        r.mmapOffset + r.size > static_cast<uint64_t>(INT64_MAX)) {
      error = where + ": empty or wraps the address space";
      undo();
      return false;
    }
    for (const auto& m : maps) {
      if (r.userAddr <= m.userAddr + (m.size - 1) && m.userAddr <= r.userAddr + (r.size - 1)) {
        error = where + ": its front-end addresses overlap region " + std::to_string(&m - &maps[0]);
        undo();
        return false;
      }
    }
    // The fd must hold every byte that will be mapped: touching a page past its end would raise
    // SIGBUS in skiff. A memfd sealed against shrinking keeps it so (QEMU's memfd backend seals
    // by default); anything else could be truncated under the mapping later.
    struct stat st;
    if (fstat(fds[i], &st) != 0 || !S_ISREG(st.st_mode)) {
      error = where + ": its fd is not a memory file (memory-backend-memfd,share=on)";
      undo();
      return false;
    }
    if (static_cast<uint64_t>(st.st_size) < r.mmapOffset + r.size) {
      error = where + ": the file holds " + std::to_string(st.st_size) + " bytes, the region needs " + std::to_string(r.mmapOffset + r.size);
      undo();
      return false;
    }
    int seals = fcntl(fds[i], F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
      error = where + ": its fd is not sealed against shrinking (use memory-backend-memfd, whose seal=on is the default)";
      undo();
      return false;
    }
    uint64_t aligned = r.mmapOffset - r.mmapOffset % page;
    uint64_t lead = r.mmapOffset - aligned;
    Mapping m;
    m.length = static_cast<size_t>(lead + r.size);
    m.base = mmap(nullptr, m.length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fds[i], static_cast<off_t>(aligned));
    if (m.base == MAP_FAILED) {
      error = where + ": mmap: " + std::strerror(errno);
      undo();
      return false;
    }
    m.userAddr = r.userAddr;
    m.guestAddr = r.guestAddr;
    m.size = r.size;
    maps.push_back(m);
    if (!memory.add({r.guestAddr, r.size, static_cast<uint8_t*>(m.base) + lead})) {
      error = where + ": overlaps another region, or its mmap offset and guest address disagree modulo 8";
      undo();
      return false;
    }
  }
  // The device and its queues hold pointers into the old table: stop them before it goes.
  stopDevice();
  unmapAll();
  mappings_ = std::move(maps);
  memory_ = std::move(memory);
  return true;
}

bool Backend::setVringFd(uint32_t request, uint64_t value, std::vector<int>& fds, std::string& error) {
  const std::string what = describe(request);
  uint64_t index = value & kVringIndexMask;
  if (value & ~(kVringIndexMask | kVringNoFd)) {
    error = what + ": reserved bits set in " + hex(value);
    return false;
  }
  if (index >= rings_.size()) {
    error = what + ": queue " + std::to_string(index) + " does not exist (the device has " + std::to_string(rings_.size()) + ")";
    return false;
  }
  bool noFd = value & kVringNoFd;
  if (fds.size() != (noFd ? 0u : 1u)) {
    error = what + ": carries " + std::to_string(fds.size()) + " fds, expected " + (noFd ? "none (no-fd flag set)" : "1");
    return false;
  }
  if (!noFd && !isEventfd(fds[0])) {
    error = what + ": the fd is not an eventfd";
    return false;
  }
  Ring& r = rings_[index];
  int fd = -1;
  if (!noFd) {
    fd = fds[0];
    fds.clear();  // ours now
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) {
      error = what + ": fcntl: " + std::strerror(errno);
      ::close(fd);
      return false;
    }
  }
  if (request == kSetVringKick) {
    if (noFd) {
      error = what + ": polling (no kick fd) is not supported";
      return false;
    }
    if (r.kick >= 0) {
      notifier_.unwatchKick(r.kick);
      closeFd(r.kick);
    }
    r.kick = fd;
    r.started = true;
    notifier_.watchKick(fd, static_cast<uint16_t>(index));
    if (!reconcile(error)) return false;
    process(static_cast<uint16_t>(index));
    return true;
  }
  int& slot = request == kSetVringCall ? r.call : r.err;
  closeFd(slot);
  slot = fd;
  // A used buffer added while the ring had no call fd (QEMU sends CALL after KICK) would otherwise
  // never be signalled: a spurious interrupt is harmless, a lost one is not.
  if (request == kSetVringCall && fd >= 0 && active_ && queues_[index].ready()) usedBuffers(static_cast<uint16_t>(index));
  return true;
}

bool Backend::translate(uint64_t userAddr, uint64_t& gpa) const {
  for (const auto& m : mappings_) {
    if (userAddr >= m.userAddr && userAddr - m.userAddr < m.size) {
      gpa = m.guestAddr + (userAddr - m.userAddr);
      return true;
    }
  }
  return false;
}

bool Backend::ringUsable(uint16_t index) const {
  const Ring& r = rings_[index];
  // Without protocol features a ring is enabled as soon as it starts; with them, only by SET_VRING_ENABLE.
  return r.started && (r.enabled || !protocolNegotiated_);
}

bool Backend::reconcile(std::string& error) {
  if (failed_ || !featuresSet_ || memory_.regions().empty()) return true;
  bool any = false;
  for (uint16_t i = 0; i < rings_.size(); ++i) {
    if (ringUsable(i) && !queues_[i].ready()) {
      if (!startQueue(i, error)) return false;
    }
    any = any || queues_[i].ready();
  }
  if (!active_ && any) {
    active_ = true;
    device_.activate(memory_, queues_, features_, *this);
  }
  return true;
}

bool Backend::startQueue(uint16_t index, std::string& error) {
  Ring& r = rings_[index];
  const std::string q = "queue " + std::to_string(index);
  if (!r.addrSet || r.num == 0) {
    error = q + " started before its size and addresses were set";
    return false;
  }
  uint64_t desc, avail, used;
  if (!translate(r.descUser, desc) || !translate(r.availUser, avail) || !translate(r.usedUser, used)) {
    error = q + ": a ring address (descriptors " + hex(r.descUser) + ", available " + hex(r.availUser) + ", used " + hex(r.usedUser) +
            ") lies outside the memory table";
    return false;
  }
  virtio::Queue& vq = queues_[index];
  vq.reset();
  vq.setSize(r.num);
  vq.setDescTable(desc);
  vq.setAvailRing(avail);
  vq.setUsedRing(used);
  vq.setNextAvail(r.base);
  std::string why;
  if (!vq.activate(memory_, features_, why)) {
    error = q + ": " + why;
    return false;
  }
  return true;
}

void Backend::stopDevice() {
  if (active_) {
    for (size_t i = 0; i < queues_.size(); ++i) {
      if (queues_[i].ready()) rings_[i].base = queues_[i].nextAvail();
    }
    device_.reset();
  }
  for (auto& q : queues_) q.reset();
  active_ = false;
  failed_ = false;  // a reset driver gets a working device again
}

void Backend::stopRing(uint16_t index) {
  Ring& r = rings_[index];
  if (active_ && queues_[index].ready()) stopDevice();  // the other rings restart on their next kick
  if (r.kick >= 0) {
    notifier_.unwatchKick(r.kick);
    closeFd(r.kick);
  }
  r.started = false;
}

void Backend::resetState() {
  stopDevice();
  for (uint16_t i = 0; i < rings_.size(); ++i) {
    stopRing(i);
    closeFd(rings_[i].call);
    closeFd(rings_[i].err);
    rings_[i] = Ring{};
  }
  unmapAll();
  memory_ = virtio::MemoryMap();
  features_ = 0;
  featuresSet_ = false;
}

void Backend::disconnect() {
  resetState();
  protocolFeatures_ = 0;
  protocolNegotiated_ = false;
  failures_ = 0;
}

void Backend::unmapAll() {
  for (auto& m : mappings_) munmap(m.base, m.length);
  mappings_.clear();
}

void Backend::closeFd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

void Backend::kicked(uint16_t queue) {
  if (queue >= rings_.size() || rings_[queue].kick < 0) return;
  uint64_t count;
  while (read(rings_[queue].kick, &count, sizeof count) < 0 && errno == EINTR) {
  }
  if (!active_ && !failed_) {
    std::string error;
    if (!reconcile(error)) {
      fail(error);
      return;
    }
  }
  process(queue);
}

void Backend::process(uint16_t queue) {
  if (!active_ || failed_ || queue >= queues_.size() || !queues_[queue].ready()) return;
  bool more = device_.process(queue);
  if (queues_[queue].failed() && !failed_) fail(queues_[queue].failure());
  if (more && !failed_) notifier_.later(queue);
}

bool Backend::withDevice(const std::function<void()>& fn) {
  if (!active_ || failed_) return false;
  fn();
  return true;
}

void Backend::usedBuffers(uint16_t queue) {
  if (queue >= rings_.size() || rings_[queue].call < 0) return;
  uint64_t one = 1;
  // EAGAIN means the counter is saturated: the front-end has a notification pending anyway.
  while (write(rings_[queue].call, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

void Backend::fail(const std::string& why) {
  if (failed_) return;
  failed_ = true;
  if (failures_++ == 0 && log_) log_(name_ + ": device failed (the driver must reset it): " + why);
  // The err fds tell the front-end (QEMU logs "vhost vring error"); the driver sees the device stop.
  for (auto& r : rings_) {
    if (r.err < 0) continue;
    uint64_t one = 1;
    while (write(r.err, &one, sizeof one) < 0 && errno == EINTR) {
    }
  }
}

// ---- Server ----

int listenUnix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) {
    throw virtio::DeviceError("socket path " + path + " is " + std::to_string(path.size()) + " bytes, the limit is " + std::to_string(sizeof addr.sun_path - 1));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) throw virtio::DeviceError(std::string("socket: ") + std::strerror(errno));
  struct stat st;
  if (lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path.c_str());  // a stale socket of an earlier run
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || chmod(path.c_str(), 0600) != 0 || listen(fd, 8) != 0) {
    int e = errno;
    ::close(fd);
    throw virtio::DeviceError("cannot listen on " + path + ": " + std::strerror(e));
  }
  return fd;
}

Server::Server(EventLoop& loop, const std::string& path, virtio::Device& device, std::string name, Log log)
    : loop_(loop), path_(path), log_(log), backend_(device, *this, std::move(name), log), alive_(std::make_shared<bool>(true)) {
  listen_ = listenUnix(path);
  try {
    loop_.add(listen_, kReadable, [this](uint32_t) { onAccept(); });
  } catch (...) {
    ::close(listen_);
    unlink(path_.c_str());
    throw;
  }
}

Server::~Server() {
  *alive_ = false;
  if (conn_ >= 0) drop("");
  backend_.disconnect();
  loop_.remove(listen_);
  ::close(listen_);
  unlink(path_.c_str());
}

void Server::onAccept() {
  int fd = accept4(listen_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0) return;
  if (conn_ >= 0) {
    if (log_) log_(backend_.name() + ": a second front-end connected to " + path_ + "; refused (one at a time)");
    ::close(fd);
    return;
  }
  conn_ = fd;
  ++connections_;
  headerGot_ = payloadGot_ = 0;
  payload_.clear();
  loop_.add(conn_, kReadable, [this](uint32_t) { onReadable(); });
}

bool Server::readMessage(bool& closed, std::string& error) {
  for (;;) {
    uint8_t* dst;
    size_t want;
    if (headerGot_ < sizeof header_) {
      dst = reinterpret_cast<uint8_t*>(&header_) + headerGot_;
      want = sizeof header_ - headerGot_;
    } else if (payloadGot_ < payload_.size()) {
      dst = payload_.data() + payloadGot_;
      want = payload_.size() - payloadGot_;
    } else {
      return true;
    }
    iovec iov{dst, want};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n = recvmsg(conn_, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n > 0) {
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; ++i) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
          fds_.push_back(fd);
        }
      }
      if (msg.msg_flags & MSG_CTRUNC) {
        error = "a message carried more than " + std::to_string(kMaxFds) + " fds";
        return false;
      }
      if (fds_.size() > kMaxFds) {
        error = "a message carried " + std::to_string(fds_.size()) + " fds, the most is " + std::to_string(kMaxFds);
        return false;
      }
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
      error = std::string("recvmsg: ") + std::strerror(errno);
      return false;
    }
    if (n == 0) {
      closed = true;
      return false;
    }
    if (headerGot_ < sizeof header_) {
      headerGot_ += static_cast<size_t>(n);
      if (headerGot_ == sizeof header_) {
        if (header_.size > kMaxPayload) {
          error = describe(header_.request) + ": payload of " + std::to_string(header_.size) + " bytes (the most any request needs is " +
                  std::to_string(kMaxPayload) + ")";
          return false;
        }
        payload_.assign(header_.size, 0);
        payloadGot_ = 0;
      }
    } else {
      payloadGot_ += static_cast<size_t>(n);
    }
  }
}

void Server::onReadable() {
  // Bounded per wake-up so one front-end's stream of messages cannot hold the loop.
  for (int i = 0; i < 64 && conn_ >= 0; ++i) {
    bool closed = false;
    std::string error;
    if (!readMessage(closed, error)) {
      if (!error.empty()) {
        drop(error);
      } else if (closed) {
        drop("");
      }
      return;
    }
    std::vector<int> fds = std::move(fds_);
    fds_.clear();
    std::string reply;
    bool ok = backend_.handle(header_, payload_.data(), fds, reply, error);
    headerGot_ = payloadGot_ = 0;
    size_t sent = 0;
    while (sent < reply.size()) {
      ssize_t n = send(conn_, reply.data() + sent, reply.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        // The front-end waits for each reply, so its socket buffer is empty: this is a broken peer.
        if (ok) error = std::string("cannot send a reply: ") + std::strerror(errno);
        ok = false;
        break;
      }
      sent += static_cast<size_t>(n);
    }
    if (!ok) {
      drop(error);
      return;
    }
  }
}

void Server::drop(const std::string& why) {
  if (!why.empty()) {
    ++protocolErrors_;
    if (log_) log_(backend_.name() + ": front-end disconnected: " + why);
  }
  if (conn_ >= 0) {
    loop_.remove(conn_);
    ::close(conn_);
    conn_ = -1;
  }
  for (int fd : fds_) ::close(fd);
  fds_.clear();
  headerGot_ = payloadGot_ = 0;
  payload_.clear();
  backend_.disconnect();
}

void Server::watchKick(int fd, uint16_t queue) {
  loop_.add(fd, kReadable, [this, queue](uint32_t) { backend_.kicked(queue); });
}

void Server::unwatchKick(int fd) { loop_.remove(fd); }

void Server::later(uint16_t queue) {
  for (uint16_t q : laterQueued_) {
    if (q == queue) return;
  }
  laterQueued_.push_back(queue);
  loop_.post([this, alive = alive_, queue]() {
    if (!*alive) return;
    for (size_t i = 0; i < laterQueued_.size(); ++i) {
      if (laterQueued_[i] == queue) {
        laterQueued_.erase(laterQueued_.begin() + static_cast<long>(i));
        break;
      }
    }
    backend_.process(queue);
  });
}

}  // namespace vhost_user
}  // namespace skiff
