// The bytes of a message between ranks: see wire.h for the layout.
#include <pipegear/distributed/detail/wire.h>

#include <algorithm>
#include <cstring>

#include <pipegear/detail/step.h>

namespace pipegear::detail {

// The fixed words of a poison message (kind, step, 6, text bytes, origin,
// broken); its text follows at the next 64-byte boundary.
constexpr int64_t kPoisonWords = 6;

int64_t put_note(int64_t* at, const std::string& text) {
  const auto n = std::min<size_t>(text.size(), kNoteBytes);
  std::memcpy(at, text.data(), n);
  return static_cast<int64_t>(n);
}

std::string get_note(const int64_t* at, int64_t bytes) {
  return std::string(reinterpret_cast<const char*>(at),
                     static_cast<size_t>(std::clamp<int64_t>(bytes, 0, kNoteBytes)));
}

Encoded encode_batch(const Batch& tensors, int64_t step,
                     const std::vector<int64_t>& shared) {
  Encoded e;
  auto& w = e.words;
  w = {kPacked, step, 0, 0,
       static_cast<int64_t>(tensors.size()) +
           (tensors.size() == 1 && tensors.tuple ? kOneTuple : 0)};
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    if (!t.defined()) {
      w.push_back(0);
      continue;
    }
    const int64_t id = i < shared.size() ? shared[i] : -1;
    w.push_back(1 + 2 * (std::max<int64_t>(id, -1) + 1));
    w.push_back(static_cast<int64_t>(t.scalar_type()));
    w.push_back(t.requires_grad() ? 1 : 0);
    w.push_back(t.dim());
    for (auto d : t.sizes()) {
      w.push_back(d);
    }
    const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
    w.push_back(e.payload);
    w.push_back(bytes);
    if (bytes > 0) {
      e.parts.emplace_back(t.detach(), e.payload);
      e.payload = align64(e.payload + bytes);
    }
  }
  TORCH_CHECK_VALUE(e.base() <= kHeaderBytes, "pipegear: a stage output of ",
                    tensors.size(), " tensors is too long to describe in ",
                    kHeaderBytes, " bytes; pass fewer tensors between stages");
  w[2] = static_cast<int64_t>(w.size());
  w[3] = e.payload;
  return e;
}

torch::Tensor write_head(const std::vector<int64_t>& words, int64_t bytes,
                         int64_t zeroed) {
  auto head = torch::empty({bytes}, torch::kUInt8);
  std::memset(head.data_ptr<uint8_t>(), 0, static_cast<size_t>(zeroed));
  std::memcpy(head.data_ptr<uint8_t>(), words.data(), 8 * words.size());
  return head;
}

void write_payload(const Encoded& e, const torch::Tensor& buffer, int64_t at) {
  for (const auto& [t, offset] : e.parts) {
    torch::from_blob(buffer.data_ptr<uint8_t>() + at + offset, t.sizes(),
                     t.options().device(buffer.device()))
        .copy_(t);
  }
}

Head read_head(const torch::Tensor& head) {
  const auto* w = reinterpret_cast<const int64_t*>(head.data_ptr<uint8_t>());
  return {w[0], w[1], w[2], w[3]};
}

void check_batch_head(const Head& h, int64_t available) {
  if ((h.kind != kPacked && h.kind != kSpill) || h.words < 5 ||
      h.words > available / 8) {
    throw BadMessage("garbled message (kind " + std::to_string(h.kind) + ", " +
                     std::to_string(h.words) + " header words)");
  }
}

Batch decode_batch(const torch::Tensor& head, const torch::Tensor& data,
                   int64_t data_offset, c10::Device device,
                   std::vector<int64_t>* shared) {
  const auto* w = reinterpret_cast<const int64_t*>(head.data_ptr<uint8_t>());
  const int64_t words = w[2];
  Batch out;
  size_t p = 5;
  auto next = [&]() {
    if (p >= static_cast<size_t>(words)) {
      throw BadMessage("truncated message header");
    }
    return w[p++];
  };
  const bool one_tuple = w[4] == 1 + kOneTuple;
  const int64_t count = one_tuple ? 1 : w[4];
  out.tuple = one_tuple;
  if (shared != nullptr) {
    shared->clear();
  }
  for (int64_t i = 0; i < count; ++i) {
    const int64_t defined = next();
    if (shared != nullptr) {
      shared->push_back(defined > 0 ? defined / 2 - 1 : -1);
    }
    if (defined == 0) {
      out.emplace_back();
      continue;
    }
    const auto dtype = static_cast<c10::ScalarType>(next());
    const bool requires_grad = next() != 0;
    const int64_t ndim = next();
    std::vector<int64_t> sizes;
    for (int64_t d = 0; d < ndim; ++d) {
      sizes.push_back(next());
    }
    const int64_t offset = next();
    const int64_t bytes = next();
    const auto options = torch::TensorOptions().dtype(dtype).device(device);
    torch::Tensor t;
    if (bytes == 0) {
      t = torch::empty(sizes, options);
    } else {
      if (!data.defined() || data_offset + offset + bytes > data.numel()) {
        throw BadMessage("a tensor lies outside its message");
      }
      // A tensor of its own over the message's memory (no copy); the
      // message lives as long as any of its tensors.
      t = torch::from_blob(data.data_ptr<uint8_t>() + data_offset + offset, sizes,
                           [keep = data](void*) mutable { keep.reset(); },
                           options);
    }
    if (requires_grad && can_require_grad(t)) {
      t.requires_grad_(true);
    }
    out.push_back(std::move(t));
  }
  return out;
}

torch::Tensor encode_poison(const Poison& p, int64_t capacity, bool fixed) {
  std::vector<int64_t> w{kPoison, p.step, kPoisonWords, 0, p.origin, p.broken ? 1 : 0};
  const int64_t base = align64(8 * kPoisonWords);
  const std::string text = p.text.substr(
      0, static_cast<size_t>(std::max<int64_t>(
             0, std::min<int64_t>(capacity - base, kNoteBytes))));
  w[3] = static_cast<int64_t>(text.size());
  auto buffer = torch::zeros({fixed ? capacity : base + w[3]}, torch::kUInt8);
  std::memcpy(buffer.data_ptr<uint8_t>(), w.data(), 8 * w.size());
  std::memcpy(buffer.data_ptr<uint8_t>() + base, text.data(), text.size());
  return buffer;
}

Poison read_poison(const torch::Tensor& head) {
  const auto* w = reinterpret_cast<const int64_t*>(head.data_ptr<uint8_t>());
  const int64_t base = align64(8 * kPoisonWords);
  const int64_t nbytes =
      std::max<int64_t>(0, std::min<int64_t>(w[3], head.numel() - base));
  Poison p;
  p.step = w[1];
  p.origin = w[4];
  p.broken = w[5] != 0;
  p.text.assign(reinterpret_cast<const char*>(head.data_ptr<uint8_t>()) + base,
                static_cast<size_t>(nbytes));
  return p;
}

} // namespace pipegear::detail
