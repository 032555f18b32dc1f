#pragma once
// Internal (never installed): moving a stage's tensors between devices and
// streams, written with the device-generic c10 API only (streams, events,
// record_stream), so the same code compiles on CPU-only torch and runs on
// CUDA. On the CPU none of it does anything. docs/engine.md, "Copies between
// devices".

#include <memory>
#include <unordered_map>

#include <c10/core/Device.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>

#include <pipegear/microbatch.h>

namespace pipegear::detail {

/// An event recorded on a stream: the tensors of a message are ready once
/// it has passed.
struct ReadyEvent {
  c10::Event event;
  c10::Stream stream;
};

/// What one stage hands to the next: tensors plus, on an accelerator, the
/// event after which they are ready.
struct Message {
  Batch tensors;
  std::shared_ptr<ReadyEvent> ready;
  /// Per tensor, the id of a skip connection whose tensor shares memory
  /// with it, kSharedInMessage when it shares memory with another tensor
  /// of the message (`return x, x`), or -1; empty when none does. The
  /// receiver must not modify a marked tensor in place (design decision
  /// 16).
  std::vector<int64_t> shared;
};

/// The mark of tensors of one message that share memory with each other
/// (no skip involved); far above any skip id, and an id on the wire too.
constexpr int64_t kSharedInMessage = int64_t{1} << 40;

/// An event recorded on the calling thread's current stream of `device`;
/// null on the CPU.
std::shared_ptr<ReadyEvent> record_ready(c10::Device device);

/// `tensors` with an event on `device`'s current stream (none on the CPU).
Message make_message(Batch tensors, c10::Device device);

/// One stage's copies: a copy stream per device it copies on (from the
/// device's pool), used by one thread at a time.
class Copier {
 public:
  /// Copies `t` onto `dst` on a copy stream ordered after `ready`; the
  /// destination's current stream waits for the copy. Plain on the CPU.
  torch::Tensor copy_to(const torch::Tensor& t, c10::Device dst,
                        const std::shared_ptr<ReadyEvent>& ready);

  /// The tensors of `m` on `device`, detached; with `as_leaves`, those that
  /// required a gradient are new leaves requiring one. A same-device
  /// tensor is not copied: the current stream waits for its event unless
  /// it is the stream the event was recorded on.
  Batch receive(Message m, c10::Device device, bool as_leaves);

 private:
  std::unordered_map<c10::Device, c10::Stream> copy_streams_;
};

} // namespace pipegear::detail
