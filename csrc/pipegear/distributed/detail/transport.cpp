// One step's messages between this rank and its neighbours: see
// transport.h.
#include <pipegear/distributed/detail/transport.h>

#include <algorithm>

namespace pipegear::detail {

std::optional<Route> C10dTransport::route(const Cell& c, bool sending) const {
  if (c.phase == Phase::kBackwardWeight) {
    return std::nullopt;  // exchanges nothing
  }
  const int64_t k = link_.world();
  const int64_t s = stage_of(c);
  // Activations go to the next stage, gradients to the previous one.
  const bool up = carries_gradient(c.phase) == sending;
  const int64_t other = up ? s - 1 : s + 1;
  if (other < 0 || other >= stages_) {
    return std::nullopt;
  }
  return Route{other % k, key_of(std::min(s, other), c.micro_batch)};
}

namespace {

std::string direction(bool backward) {
  return backward ? "the gradients" : "the activations";
}

} // namespace

std::string C10dTransport::describe_key(int64_t key, bool backward,
                                        bool incoming) const {
  const int64_t j = key % chunks_;
  if (stages_ == link_.world()) {
    return "micro-batch " + std::to_string(j);
  }
  // Interleaved: the boundary's lower stage runs here for activations sent
  // and gradients received, on the previous rank otherwise.
  const int64_t lower = backward == incoming ? link_.rank() : peer(false);
  const int64_t e = key / chunks_ * link_.world() + lower;
  return "micro-batch " + std::to_string(j) + " between stages " +
      std::to_string(e) + " and " + std::to_string(e + 1);
}

std::string C10dTransport::receiving(int64_t key, bool backward,
                                     int64_t src) const {
  return "receiving " + direction(backward) + " of " +
      describe_key(key, backward, /*incoming=*/true) + " from rank " +
      std::to_string(src);
}

Message C10dTransport::recv_forward(int64_t s, int64_t j) {
  const int64_t key = key_of(s - 1, j);
  received_.insert({false, key});
  return recv(peer(false), key, false, false);
}

void C10dTransport::send_forward(int64_t s, int64_t j, Message m) {
  const int64_t key = key_of(s, j);
  sent_.insert({false, key});
  send(peer(true), key, false, m.tensors, m.shared);
}

Message C10dTransport::recv_backward(int64_t s, int64_t j) {
  const int64_t key = key_of(s, j);
  received_.insert({true, key});
  return recv(peer(true), key, true, false);
}

void C10dTransport::send_backward(int64_t s, int64_t j, Message m) {
  const int64_t key = key_of(s - 1, j);
  sent_.insert({true, key});
  send(peer(false), key, true, m.tensors);
}

void C10dTransport::begin_pass(const std::vector<Cell>& cells, bool forward,
                               bool backward) {
  for (int d = 0; d < 2; ++d) {
    expected_[d].clear();
    next_[d] = 0;
  }
  for (const auto& c : cells) {
    const bool bwd = carries_gradient(c.phase);
    const auto r = route(c, /*sending=*/false);
    if (r && (bwd ? backward : forward)) {
      expected_[bwd].push_back(r->key);
    }
  }
  if (!link_.nccl()) {
    for (int d = 0; d < 2; ++d) {
      for (int i = 0; i < kPrepost; ++i) {
        post_next(d != 0);
      }
    }
  }
}

void C10dTransport::grow_capacities(bool forward, bool backward) const {
  for (int d = 0; d < 2; ++d) {
    if (d == 0 ? forward : backward) {
      link_.grow(d != 0, largest_sent_[d], largest_received_[d]);
    }
  }
}

bool C10dTransport::send_poison(int64_t dst, int64_t key, bool backward, int64_t origin,
                                bool broken, const std::string& text) {
  sent_.insert({backward, key});
  if (is_bad(dst)) {
    return false;
  }
  try {
    const auto notice = encode_poison({seq_, origin, broken, text},
                                      link_.capacity(backward, /*send=*/true),
                                      /*fixed=*/link_.nccl());
    post(notice.to(device()), dst, link_.tag_of(key, backward), "a failure notice");
    return true;
  } catch (const std::exception&) {
    bad_peers_.insert(dst);  // the peer is gone: nothing to tell it
    return false;
  }
}

bool C10dTransport::drain(int64_t src, int64_t key, bool backward) {
  received_.insert({backward, key});
  if (is_bad(src)) {
    return false;
  }
  try {
    recv(src, key, backward, /*discard=*/true);
    return true;
  } catch (const std::exception&) {
    bad_peers_.insert(src);
    return false;
  }
}

void C10dTransport::poisoned(Poison p, const std::string& what) {
  kind = FailKind::kPeer;
  origin = p.origin;
  peer_broken = p.broken;
  peer_text = std::move(p.text);
  TORCH_CHECK(false, "pipegear: rank ", link_.rank(), ": rank ", origin,
              " failed in step ", p.step, ", so this rank stops too (", what,
              "): ", peer_text);
}

void C10dTransport::lost(int64_t peer) {
  if (kind == FailKind::kNone) {
    kind = FailKind::kComm;
    lost_peer = peer;
  }
  bad_peers_.insert(peer);
}

void C10dTransport::comm_failure(int64_t peer, const std::string& msg) {
  lost(peer);
  TORCH_CHECK(false, msg);
}

C10dTransport::Posted C10dTransport::post_receive(int64_t src, int64_t key, bool backward,
                                                  const std::string& what) {
  auto buffer = torch::empty({link_.capacity(backward, /*send=*/false)},
                             torch::TensorOptions().dtype(torch::kUInt8).device(device()));
  return {buffer, post_recv(buffer, src, link_.tag_of(key, backward), what)};
}

void C10dTransport::post_next(bool backward) {
  auto& list = expected_[backward];
  auto& next = next_[backward];
  if (next >= list.size()) {
    return;
  }
  const int64_t key = list[next++];
  const int64_t src = peer(backward);
  if (is_bad(src)) {
    return;
  }
  posted_[{backward, key}] =
      post_receive(src, key, backward, receiving(key, backward, src));
}

c10::intrusive_ptr<c10d::Work> C10dTransport::post_recv(const torch::Tensor& buffer,
                                                       int64_t src, int tag,
                                                       const std::string& what) {
  return on_link(src, [&] {
    return link_.recv(buffer, src, tag, what, seq_, OnError::kThrow);
  });
}

void C10dTransport::wait(const c10::intrusive_ptr<c10d::Work>& work, int64_t peer,
                         const std::string& what) {
  on_link(peer, [&] { link_.wait(work, peer, what, seq_); });
}

void C10dTransport::post(const torch::Tensor& t, int64_t dst, int tag,
                         const std::string& what) {
  on_link(dst, [&] { link_.send(t, dst, tag, what, seq_, OnError::kThrow); });
}

void C10dTransport::send(int64_t dst, int64_t key, bool backward, const Batch& tensors,
                         const std::vector<int64_t>& shared) {
  const std::string what = direction(backward) + " of " +
      describe_key(key, backward, /*incoming=*/false);
  link_.prune();
  Encoded e = encode_batch(tensors, seq_, shared);
  largest_sent_[backward] = std::max(largest_sent_[backward], e.total());
  post_encoded(e, link_.capacity(backward, /*send=*/true), dst,
               link_.tag_of(key, backward), what);
}

void C10dTransport::post_encoded(Encoded& e, int64_t cap, int64_t dst, int tag,
                                 const std::string& what) {
  const int64_t base = e.base();
  const int64_t total = e.total();
  const bool packed = total <= cap;
  e.words[0] = packed ? kPacked : kSpill;
  // The header region (and the payload, when packed), built on the CPU
  // side when the tensors are there, else on the device.
  const int64_t first = link_.nccl() ? cap : (packed ? total : base);
  auto head = write_head(e.words, first, link_.nccl() ? first : base);
  torch::Tensor message = device().is_cpu() ? head : head.to(device());
  torch::Tensor spill;
  if (packed) {
    write_payload(e, message, base);
  } else {
    spill = torch::empty({e.payload},
                         torch::TensorOptions().dtype(torch::kUInt8).device(device()));
    write_payload(e, spill, 0);
  }
  post(message, dst, tag, what);
  if (!packed) {
    post(spill, dst, tag, what);
  }
}

Message C10dTransport::recv(int64_t src, int64_t key, bool backward, bool discard) {
  const std::string what = receiving(key, backward, src);
  Posted posted;
  auto it = posted_.find({backward, key});
  if (it != posted_.end()) {
    posted = std::move(it->second);
    posted_.erase(it);
  } else {
    posted = post_receive(src, key, backward, what);
  }
  wait(posted.work, src, what);
  if (!link_.nccl()) {
    post_next(backward);  // keep the window full
  }
  const torch::Tensor head = head_of(posted.buffer);
  const Head h = read_head(head);
  if (discard && h.kind == kPoison) {
    return {};
  }
  check_head(head, h, src, what,
             " (module style: did every rank run the backward of the previous "
             "forward?)");
  largest_received_[backward] =
      std::max(largest_received_[backward], h.base() + h.payload);
  if (discard) {
    payload_of(posted, h, src, link_.tag_of(key, backward), what);
    return {};
  }
  return decode(posted, head, h, src, link_.tag_of(key, backward), what);
}

torch::Tensor C10dTransport::head_of(const torch::Tensor& buffer) const {
  return device().is_cpu()
      ? buffer
      : buffer.narrow(0, 0, std::min<int64_t>(kHeaderBytes, buffer.numel())).cpu();
}

void C10dTransport::check_head(const torch::Tensor& head, const Head& h,
                               int64_t src, const std::string& what,
                               const char* step_hint) {
  if (h.kind == kPoison) {
    poisoned(read_poison(head), what);
  }
  const std::string here = "pipegear: rank " + std::to_string(link_.rank()) + ": ";
  try {
    check_batch_head(h, head.numel());
  } catch (const BadMessage& e) {
    comm_failure(src, here + e.what() + " while " + what);
  }
  if (h.step != seq_) {
    comm_failure(src, here + what + ": got a message of step " +
                          std::to_string(h.step) + " during step " +
                          std::to_string(seq_) + step_hint);
  }
}

Message C10dTransport::decode(const Posted& posted, const torch::Tensor& head,
                              const Head& h, int64_t src, int tag,
                              const std::string& what) {
  const auto [data, data_offset] = payload_of(posted, h, src, tag, what);
  Message m;
  try {
    m.tensors = decode_batch(head, data, data_offset, device(), &m.shared);
  } catch (const BadMessage& e) {
    comm_failure(src, "pipegear: rank " + std::to_string(link_.rank()) + ": " +
                          e.what() + " while " + what);
  }
  return m;
}

int64_t C10dTransport::skip_rank(int64_t id, bool popper) const {
  TORCH_CHECK(skip_routes_ != nullptr &&
                  2 * id + 1 < static_cast<int64_t>(skip_routes_->size()),
              "pipegear: rank ", link_.rank(), ": skip ", id,
              " has no route (DistributedOptions::skip_routes)");
  return (*skip_routes_)[2 * id + (popper ? 1 : 0)];
}

Message C10dTransport::recv_skip(int64_t id, int64_t j) {
  return recv_skip_message(id, j, /*grad=*/false);
}

void C10dTransport::send_skip(int64_t id, int64_t j, Message m) {
  send_skip_message(id, j, /*grad=*/false, m);
}

Message C10dTransport::recv_skip_grad(int64_t id, int64_t j) {
  return recv_skip_message(id, j, /*grad=*/true);
}

void C10dTransport::send_skip_grad(int64_t id, int64_t j, Message m) {
  send_skip_message(id, j, /*grad=*/true, m);
}

std::string C10dTransport::skip_what(int64_t id, int64_t j, bool grad) {
  return std::string(grad ? "the gradient of skip " : "skip ") +
      std::to_string(id) + " of micro-batch " + std::to_string(j);
}

// A skip's tensor goes from its stashing rank to its popping rank, its
// gradient back.
void C10dTransport::send_skip_message(int64_t id, int64_t j, bool grad,
                                      const Message& m) {
  link_.prune();
  Encoded e = encode_batch(m.tensors, seq_, m.shared);
  // A skip's messages have no grown capacity: the header's size.
  post_encoded(e, kHeaderBytes, skip_rank(id, /*popper=*/!grad),
               link_.skip_tag(id, j, grad), skip_what(id, j, grad));
}

Message C10dTransport::recv_skip_message(int64_t id, int64_t j, bool grad) {
  const int64_t src = skip_rank(id, /*popper=*/grad);
  const int tag = link_.skip_tag(id, j, grad);
  const std::string what =
      "receiving " + skip_what(id, j, grad) + " from rank " + std::to_string(src);
  auto buffer = torch::empty({kHeaderBytes},
                             torch::TensorOptions().dtype(torch::kUInt8).device(device()));
  Posted posted{buffer, post_recv(buffer, src, tag, what)};
  wait(posted.work, src, what);
  const torch::Tensor head = head_of(buffer);
  const Head h = read_head(head);
  check_head(head, h, src, what, "");
  return decode(posted, head, h, src, tag, what);
}

std::pair<torch::Tensor, int64_t> C10dTransport::payload_of(const Posted& posted,
                                                            const Head& h, int64_t src,
                                                            int tag,
                                                            const std::string& what) {
  const int64_t base = h.base();
  if (h.kind == kPacked && 2 * (base + h.payload) < posted.buffer.numel()) {
    // Much smaller than the link's capacity (shapes shrank since a larger
    // step): a right-sized copy, so that a kept tensor (a checkpointed
    // stage input) does not hold the whole receive buffer.
    return {posted.buffer.narrow(0, base, h.payload).clone(), 0};
  }
  if (h.kind == kPacked) {
    return {posted.buffer, base};
  }
  if (h.payload == 0) {
    return {torch::Tensor(), 0};
  }
  auto data = torch::empty({h.payload},
                           torch::TensorOptions().dtype(torch::kUInt8).device(device()));
  wait(post_recv(data, src, tag, what), src, what);
  return {data, 0};
}

} // namespace pipegear::detail
