#include "devices/serial.h"

namespace skiff {
namespace {
// Register offsets and bits (PC16550D data sheet).
constexpr uint16_t kData = 0, kIer = 1, kIir = 2, kLcr = 3, kMcr = 4, kLsr = 5, kMsr = 6, kScr = 7;
constexpr uint8_t kIerRxAvailable = 0x01, kIerThrEmpty = 0x02;
constexpr uint8_t kIirNone = 0x01, kIirThrEmpty = 0x02, kIirRxAvailable = 0x04, kIirFifoEnabled = 0xc0;
constexpr uint8_t kLcrDlab = 0x80;
constexpr uint8_t kMcrLoopback = 0x10;
constexpr uint8_t kLsrDataReady = 0x01, kLsrThrEmpty = 0x20, kLsrIdle = 0x40;
// With no modem attached: carrier detect, data set ready, clear to send.
constexpr uint8_t kMsrDefault = 0x80 | 0x20 | 0x10;
}  // namespace

uint8_t Serial::interruptId() const {
  if ((ier_ & kIerRxAvailable) && !rx_.empty()) return kIirRxAvailable;
  if ((ier_ & kIerThrEmpty) && thrEmptyPending_) return kIirThrEmpty;
  return kIirNone;
}

// Called with mu_ held. An edge on each new interrupt condition, as an ISA UART gives.
void Serial::updateIrq() {
  bool pending = interruptId() != kIirNone;
  if (pending && !irqRaised_) irq_();
  irqRaised_ = pending;
}

uint8_t Serial::read(uint16_t offset) {
  std::lock_guard<std::mutex> lock(mu_);
  uint8_t value = 0;
  switch (offset) {
    case kData:
      if (lcr_ & kLcrDlab) return dll_;
      if (!rx_.empty()) {
        value = rx_.front();
        rx_.pop_front();
      }
      break;
    case kIer:
      return (lcr_ & kLcrDlab) ? dlh_ : ier_;
    case kIir:
      value = interruptId() | ((fcr_ & 1) ? kIirFifoEnabled : 0);
      if ((value & 0x0f) == kIirThrEmpty) thrEmptyPending_ = false;  // reading IIR acknowledges it
      break;
    case kLcr:
      return lcr_;
    case kMcr:
      return mcr_;
    case kLsr:
      return kLsrThrEmpty | kLsrIdle | (rx_.empty() ? 0 : kLsrDataReady);
    case kMsr:
      if (mcr_ & kMcrLoopback) {
        // Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD; Linux's probe checks this.
        return uint8_t(((mcr_ & 0x01) << 5) | ((mcr_ & 0x02) << 3) | ((mcr_ & 0x04) << 4) | ((mcr_ & 0x08) << 4));
      }
      return kMsrDefault;
    case kScr:
      return scr_;
    default:
      return 0xff;
  }
  updateIrq();
  return value;
}

void Serial::write(uint16_t offset, uint8_t value) {
  std::unique_lock<std::mutex> lock(mu_);
  switch (offset) {
    case kData:
      if (lcr_ & kLcrDlab) {
        dll_ = value;
        return;
      }
      if (mcr_ & kMcrLoopback) {
        if (rx_.size() < kInputMax) rx_.push_back(value);
      } else {
        output_(&value, 1);
      }
      thrEmptyPending_ = true;  // the byte left at once: the holding register is empty again
      break;
    case kIer:
      if (lcr_ & kLcrDlab) {
        dlh_ = value;
        return;
      }
      // Enabling the THR-empty interrupt while the register is empty raises it at once.
      if ((value & kIerThrEmpty) && !(ier_ & kIerThrEmpty)) thrEmptyPending_ = true;
      ier_ = value & 0x0f;
      break;
    case kIir:
      fcr_ = value;
      if (value & 0x02) rx_.clear();  // FCR: clear the receive FIFO
      break;
    case kLcr:
      lcr_ = value;
      return;
    case kMcr:
      mcr_ = value & 0x1f;
      return;
    case kScr:
      scr_ = value;
      return;
    default:
      return;  // LSR and MSR are read-only
  }
  updateIrq();
}

void Serial::input(const uint8_t* data, size_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < size && rx_.size() < kInputMax; i++) rx_.push_back(data[i]);
  irqRaised_ = false;  // new data is a new condition: give the guest a fresh edge
  updateIrq();
}

}  // namespace skiff
