// An 8250/16550A UART as Linux's 8250 driver and a polling guest expect it: divisor latch,
// interrupt identification, loopback (the driver's probe tests it), and a receive queue fed by
// the host. Registers are 8 bits at offsets 0-7 from the base port.
#pragma once
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>

namespace skiff {

class Serial {
 public:
  using Output = std::function<void(const uint8_t* data, size_t size)>;
  using Irq = std::function<void()>;  // pulses the UART's interrupt line (ISA: edge)

  Serial(Output output, Irq irq) : output_(std::move(output)), irq_(std::move(irq)) {}

  uint8_t read(uint16_t offset);
  void write(uint16_t offset, uint8_t value);
  // From any thread: bytes typed on the host console. The queue is bounded; excess is dropped.
  void input(const uint8_t* data, size_t size);

 private:
  uint8_t interruptId() const;
  void updateIrq();

  static constexpr size_t kInputMax = 64 * 1024;
  Output output_;
  Irq irq_;
  std::mutex mu_;
  std::deque<uint8_t> rx_;
  uint8_t ier_ = 0, lcr_ = 0, mcr_ = 0x08, scr_ = 0, dll_ = 12, dlh_ = 0, fcr_ = 0;
  bool thrEmptyPending_ = false;  // THR-empty interrupt pending until IIR is read or THR written
  bool irqRaised_ = false;
};

}  // namespace skiff
