#include <pipegear/detail/copy.h>

#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

namespace pipegear::detail {

std::shared_ptr<ReadyEvent> record_ready(c10::Device device) {
  if (device.is_cpu()) {
    return nullptr;
  }
  c10::impl::VirtualGuardImpl impl(device.type());
  const auto stream = impl.getStream(device);
  auto ready = std::make_shared<ReadyEvent>(
      ReadyEvent{c10::Event(device.type()), stream});
  ready->event.record(stream);
  return ready;
}

Message make_message(Batch tensors, c10::Device device) {
  return Message{std::move(tensors), record_ready(device)};
}

Batch Copier::receive(Message m, c10::Device device, bool as_leaves) {
  Batch out;
  out.tuple = m.tensors.tuple;
  out.reserve(m.tensors.size());
  std::optional<c10::Stream> waited;  // the current stream, once it waited
  for (auto& t : m.tensors) {
    if (!t.defined()) {
      out.emplace_back();
      continue;
    }
    const bool grad = as_leaves && t.requires_grad();
    torch::Tensor r;
    if (t.device() == device) {
      r = t.detach();
      if (m.ready && !device.is_cpu()) {
        // Same device, maybe another stream (the caller's, another
        // stage's): wait for it, unless it is ours.
        c10::impl::VirtualGuardImpl impl(device.type());
        const auto current = impl.getStream(device);
        if (m.ready->stream != current) {
          if (!waited) {
            m.ready->event.block(current);
            waited = current;
          }
          r.record_stream(current);
        }
      }
    } else {
      r = copy_to(t.detach(), device, m.ready);
    }
    out.push_back(grad ? r.requires_grad_(true) : r);
  }
  return out;
}

torch::Tensor Copier::copy_to(const torch::Tensor& t, c10::Device dst,
                              const std::shared_ptr<ReadyEvent>& ready) {
  const c10::Device src = t.device();
  if (src.is_cpu() && dst.is_cpu()) {
    return t;
  }
  // The copy runs on a copy stream of the accelerator side.
  const c10::Device side = dst.is_cpu() ? src : dst;
  c10::impl::VirtualGuardImpl impl(side.type());
  auto it = copy_streams_.find(side);
  if (it == copy_streams_.end()) {
    it = copy_streams_.emplace(side, impl.getStreamFromGlobalPool(side)).first;
  }
  const c10::Stream copy_stream = it->second;
  if (ready) {
    ready->event.block(copy_stream);
  }
  torch::Tensor r;
  {
    c10::StreamGuard guard(copy_stream);
    r = t.to(dst, /*non_blocking=*/true);
  }
  if (!src.is_cpu()) {
    t.record_stream(copy_stream);  // not reused before the copy is done
  }
  c10::Event copied(side.type());
  copied.record(copy_stream);
  if (dst.is_cpu()) {
    copied.synchronize();
  } else {
    const auto compute = impl.getStream(dst);
    copied.block(compute);
    r.record_stream(compute);
  }
  return r;
}

} // namespace pipegear::detail
