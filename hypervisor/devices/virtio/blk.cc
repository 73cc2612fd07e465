#include "devices/virtio/blk.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

namespace skiff {
namespace virtio {
namespace {

struct RequestHeader {
  uint32_t type;
  uint32_t reserved;
  uint64_t sector;
};
static_assert(sizeof(RequestHeader) == 16, "virtio_blk_outhdr is 16 bytes");

struct Segment {  // virtio_blk_discard_write_zeroes
  uint64_t sector;
  uint32_t sectors;
  uint32_t flags;
};
static_assert(sizeof(Segment) == 16, "virtio_blk_discard_write_zeroes is 16 bytes");
constexpr uint32_t kSegmentUnmap = 1;

// More spans than descriptors can arise where a buffer crosses memory regions; IOV_MAX bounds one
// preadv/pwritev.
constexpr size_t kMaxSpans = IOV_MAX;

template <typename T>
void put(std::array<uint8_t, Block::kConfigSize>& config, size_t offset, T value) {
  std::memcpy(config.data() + offset, &value, sizeof value);
}

std::string errnoText(const std::string& call) { return call + ": " + std::strerror(errno); }

// Runs preadv/pwritev until `iov` is done, resuming after short transfers. A read past the end of
// the file (it shrank underneath us) leaves zeros. False on an I/O error.
bool transferAll(int fd, std::vector<iovec>& iov, off_t offset, bool toFile) {
  size_t first = 0;
  while (first < iov.size()) {
    int count = static_cast<int>(iov.size() - first);
    ssize_t n = toFile ? pwritev(fd, iov.data() + first, count, offset) : preadv(fd, iov.data() + first, count, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    if (n == 0) {
      if (toFile) return false;
      for (size_t i = first; i < iov.size(); ++i) std::memset(iov[i].iov_base, 0, iov[i].iov_len);
      return true;
    }
    offset += n;
    auto done = static_cast<size_t>(n);
    while (first < iov.size() && done >= iov[first].iov_len) done -= iov[first++].iov_len;
    if (done > 0) {
      // Partly transferred span: advance into it. iov_base points into guest memory the span
      // already covers; done < iov_len keeps it inside.
      iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + done;
      iov[first].iov_len -= done;
    }
  }
  return true;
}

}  // namespace

std::unique_ptr<Block> Block::open(const std::string& path, const BlockOptions& options) {
  int fd = ::open(path.c_str(), (options.readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (fd < 0) throw DeviceError(errnoText("open(" + path + ")"));
  // Two writers on one image corrupt it; readers may share (QEMU takes the same kind of lock).
  if (flock(fd, (options.readOnly ? LOCK_SH : LOCK_EX) | LOCK_NB) != 0) {
    std::string why = errno == EWOULDBLOCK ? path + " is in use by another machine" : errnoText("flock(" + path + ")");
    ::close(fd);
    throw DeviceError(why);
  }
  return std::make_unique<Block>(fd, options);
}

Block::Block(int fd, const BlockOptions& options) : fd_(fd), options_(options) {
  struct stat st;
  if (fstat(fd_, &st) != 0) {
    std::string why = errnoText("fstat(disk image)");
    ::close(fd_);
    throw DeviceError(why);
  }
  // lseek to the end sizes regular files and block devices alike.
  off_t end = lseek(fd_, 0, SEEK_END);
  if (end < 0) {
    std::string why = errnoText("lseek(disk image)");
    ::close(fd_);
    throw DeviceError(why);
  }
  capacity_ = static_cast<uint64_t>(end) / kSectorSize;
  if (options_.id.size() > kIdBytes) options_.id.resize(kIdBytes);

  // virtio_blk_config (§5.2.4); fields whose feature is not offered stay zero.
  put<uint64_t>(config_, 0, capacity_);
  put<uint32_t>(config_, 12, kQueueSize - 2);  // seg_max: a chain also holds the header and status
  put<uint32_t>(config_, 20, kSectorSize);     // blk_size
  put<uint16_t>(config_, 34, 1);               // num_queues
  put<uint32_t>(config_, 36, kMaxDiscardSectors);
  put<uint32_t>(config_, 40, kMaxDiscardSegments);
  put<uint32_t>(config_, 44, kDiscardAlignment);
  put<uint32_t>(config_, 48, kMaxDiscardSectors);  // max_write_zeroes_sectors
  put<uint32_t>(config_, 52, kMaxDiscardSegments);
  config_[56] = 1;  // write_zeroes_may_unmap: a punched hole reads back as zeros
}

Block::~Block() { ::close(fd_); }

uint64_t Block::features() const {
  uint64_t f = kFVersion1 | kFEventIdx | kFIndirectDesc | kFSegMax | kFBlkSize;
  return options_.readOnly ? f | kFRo : f | kFFlush | kFDiscard | kFWriteZeroes;
}

void Block::readConfig(uint32_t offset, uint8_t* data, uint32_t size) const {
  if (offset <= kConfigSize && size <= kConfigSize - offset) std::memcpy(data, config_.data() + offset, size);
}

void Block::activate(const MemoryMap& memory, std::vector<Queue>& queues, uint64_t features, Guest& guest) {
  memory_ = &memory;
  queues_ = &queues;
  guest_ = &guest;
  negotiated_ = features;
}

void Block::reset() {
  memory_ = nullptr;
  queues_ = nullptr;
  guest_ = nullptr;
  negotiated_ = 0;
}

bool Block::process(uint16_t index) {
  if (guest_ == nullptr || index != 0) return false;
  return drainQueue((*queues_)[0], 0, *guest_, kQueueSize,
                    [&](const Chain& chain, uint32_t& usedLen, std::string& why) { return handle(*memory_, chain, usedLen, why); });
}

bool Block::handle(const MemoryMap& memory, const Chain& chain, uint32_t& usedLen, std::string& why) {
  // The status byte is the chain's last writable byte (§5.2.6); without one nothing can be said.
  if (chain.writableBytes == 0) {
    why = "block request without a writable status byte";
    return false;
  }
  // Split off the status byte: the data part is the writable buffers less that last byte.
  std::vector<Buffer> data(chain.writable);
  Buffer& last = data.back();  // non-empty: the walk drops zero-length buffers and bytes > 0
  uint64_t statusGpa = last.gpa + last.len - 1;  // inside guest memory: the walk checked the buffer
  if (--last.len == 0) data.pop_back();

  uint8_t status = kSIoErr;
  uint32_t written = 0;
  Cursor in(memory, chain.readable);
  RequestHeader h;
  if (in.read(&h, sizeof h)) {
    switch (h.type) {
      case kTIn:
        status = read(memory, data, h.sector, written);
        break;
      case kTOut:
        // §5.2.6.2: a read-only device fails writes and writes nothing.
        status = options_.readOnly ? kSIoErr : write(in, h.sector);
        break;
      case kTFlush:
        status = options_.readOnly || fdatasync(fd_) == 0 ? kSOk : kSIoErr;
        break;
      case kTGetId: {
        std::array<uint8_t, kIdBytes> id{};  // NUL-padded; not terminated when all 20 are used
        std::memcpy(id.data(), options_.id.data(), options_.id.size());
        Cursor out(memory, data);
        uint32_t n = out.remaining() < kIdBytes ? static_cast<uint32_t>(out.remaining()) : kIdBytes;
        if (out.write(id.data(), n)) {
          written = n;
          status = kSOk;
        }
        break;
      }
      case kTDiscard:
      case kTWriteZeroes:
        status = discardOrZero(in, h.type);
        break;
      default:
        status = kSUnsupp;
        break;
    }
  }
  memory.put(statusGpa, status);
  usedLen = written + 1;
  return true;
}

uint8_t Block::read(const MemoryMap& memory, const std::vector<Buffer>& data, uint64_t sector, uint32_t& written) {
  Cursor out(memory, data);
  uint64_t len = out.remaining();
  if (len % kSectorSize != 0 || !inRange(sector, len / kSectorSize)) return kSIoErr;
  std::vector<iovec> iov;
  if (!out.spans(len, iov, kMaxSpans)) return kSIoErr;
  // sector * 512 cannot overflow: sector <= capacity, which came from an off_t.
  if (!transferAll(fd_, iov, static_cast<off_t>(sector * kSectorSize), false)) return kSIoErr;
  written = static_cast<uint32_t>(len);  // len <= writableBytes, a uint32_t
  return kSOk;
}

uint8_t Block::write(Cursor& in, uint64_t sector) {
  uint64_t len = in.remaining();
  if (len % kSectorSize != 0 || !inRange(sector, len / kSectorSize)) return kSIoErr;
  std::vector<iovec> iov;
  if (!in.spans(len, iov, kMaxSpans)) return kSIoErr;
  return transferAll(fd_, iov, static_cast<off_t>(sector * kSectorSize), true) ? kSOk : kSIoErr;
}

uint8_t Block::discardOrZero(Cursor& in, uint32_t type) {
  bool discard = type == kTDiscard;
  if (!(negotiated_ & (discard ? kFDiscard : kFWriteZeroes)) || options_.readOnly) return kSUnsupp;
  uint64_t len = in.remaining();
  if (len == 0 || len % sizeof(Segment) != 0 || len / sizeof(Segment) > kMaxDiscardSegments) return kSIoErr;
  Segment segments[kMaxDiscardSegments];
  size_t count = len / sizeof(Segment);
  if (!in.read(segments, len)) return kSIoErr;
  // Every segment is checked before any is carried out, so a bad one leaves the disk untouched.
  for (size_t i = 0; i < count; ++i) {
    const Segment& s = segments[i];
    // §5.2.6.2: unknown flags, and unmap on a discard, are unsupported.
    if ((s.flags & ~kSegmentUnmap) || (discard && (s.flags & kSegmentUnmap))) return kSUnsupp;
    if (s.sectors > kMaxDiscardSectors || !inRange(s.sector, s.sectors)) return kSIoErr;
  }
  for (size_t i = 0; i < count; ++i) {
    const Segment& s = segments[i];
    uint64_t offset = s.sector * kSectorSize, bytes = uint64_t(s.sectors) * kSectorSize;
    if (bytes == 0) continue;
    if (discard) {
      // A discard is a hint: a file system that cannot punch holes still did its job.
      if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(bytes)) != 0 &&
          errno != EOPNOTSUPP) {
        return kSIoErr;
      }
    } else if (uint8_t status = zero(offset, bytes, s.flags & kSegmentUnmap); status != kSOk) {
      return status;
    }
  }
  return kSOk;
}

// WRITE_ZEROES: with unmap (and write_zeroes_may_unmap) the range becomes a hole; without, it
// must stay allocated, so it is zeroed in place. Each falls back to the next method the file
// system supports, down to writing zeros.
uint8_t Block::zero(uint64_t offset, uint64_t len, bool unmap) {
  if (unmap && fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(len)) == 0) return kSOk;
  if (unmap && errno != EOPNOTSUPP) return kSIoErr;
  if (fallocate(fd_, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(len)) == 0) return kSOk;
  if (errno != EOPNOTSUPP) return kSIoErr;
  static const std::array<uint8_t, 64 * 1024> zeros{};
  while (len > 0) {
    size_t n = len < zeros.size() ? static_cast<size_t>(len) : zeros.size();
    ssize_t done = pwrite(fd_, zeros.data(), n, static_cast<off_t>(offset));
    if (done < 0 && errno == EINTR) continue;
    if (done <= 0) return kSIoErr;
    offset += static_cast<uint64_t>(done);
    len -= static_cast<uint64_t>(done);
  }
  return kSOk;
}

}  // namespace virtio
}  // namespace skiff
