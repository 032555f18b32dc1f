#pragma once
// Internal (never installed): the distributed pipeline's Transport (the
// interface the cells of a stage talk through, detail/cells.h): one step's
// activations and gradients between this rank and its neighbours, as
// messages laid out by wire.h and moved over the Link (link.h). Receives
// posted ahead of time, payloads that spill out of a link's capacity, the
// two halves of the failure protocol (poison the peers waiting for this
// rank, drain what it is still owed), and how the step failed, as far as
// the transport saw it.
//
// The receiver posts each receive ahead of time (Gloo: a window of
// kPrepost messages per direction, at the start of the pass) with a
// *capacity*: Gloo accepts a message shorter than the receive. Both ends
// know the capacity of a link without talking: 64 KiB, raised after
// every pass that all ranks completed to the largest message of the link
// so far. A message that fits (the steady state: same shapes every step)
// travels whole, as soon as it is sent, while the receiver computes; one
// that does not spills its payload into a second message, received once
// the header has told its size. NCCL matches messages by posting order and
// exact size, so there the capacity is fixed (kHeaderBytes, messages
// padded to it) and nothing is posted early.

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <pipegear/detail/cells.h>
#include <pipegear/distributed/detail/link.h>
#include <pipegear/distributed/detail/wire.h>
#include <pipegear/schedule.h>

namespace pipegear::detail {

/// Why the current step failed, as seen by this rank's transport.
enum class FailKind : uint8_t {
  kNone,
  kPeer,  // a peer's poison message: it failed and told us
  kComm,  // a timeout, a lost connection or a garbled message
};

/// A message between two neighbouring stages: the rank at the other end
/// and the message's key, which names it among the messages of its
/// direction on that link. Stage s runs on rank s % K (K ranks; with v
/// stages per rank, interleaved, rank r runs stages r, r + K, ...), so a
/// link between neighbouring ranks carries the messages of up to v stage
/// boundaries: boundary e (between stages e and e + 1) keys micro-batch j
/// as (e / K) * chunks + j, the same on both ends. With one stage per rank
/// the key is j.
struct Route {
  int64_t peer;
  int64_t key;
};

/// One step's messages of this rank. The transport remembers which of them
/// went out and came in, so that the failure protocol knows what is still
/// owed.
class C10dTransport final : public Transport {
 public:
  /// `skip_routes`: DistributedOptions::skip_routes (outlives the
  /// transport). `stages`: the pipeline's stages (K * v); `chunks`: the
  /// micro-batches a step may have at most.
  C10dTransport(Link& link, int64_t seq, int64_t stages, int64_t chunks,
                const std::vector<int64_t>* skip_routes = nullptr)
      : link_(link), seq_(seq), stages_(stages), chunks_(chunks),
        skip_routes_(skip_routes) {}

  /// The stage this rank runs for cell `c` (Cell::chunk * K + rank).
  int64_t stage_of(const Cell& c) const {
    return c.chunk * link_.world() + link_.rank();
  }
  /// The message cell `c` sends (`sending`) or receives: none at the ends
  /// of the pipeline and for W cells.
  std::optional<Route> route(const Cell& c, bool sending) const;

  // A message counts as received (not owed any more) once its receive
  // starts: a poison message is received too, and after a transport error
  // the peer is not drained anyway.
  Message recv_forward(int64_t s, int64_t j) override;
  void send_forward(int64_t s, int64_t j, Message m) override;
  Message recv_backward(int64_t s, int64_t j) override;
  void send_backward(int64_t s, int64_t j, Message m) override;
  // Skips go straight between the stashing and the popping rank, on tags
  // of their own, at the fixed capacity kHeaderBytes (a larger payload
  // spills), nothing posted early. A step with skips that fails leaves
  // the pipeline broken (Protocol::agree): what was sent and not received
  // cannot be drained without knowing what the producer sent.
  Message recv_skip(int64_t id, int64_t j) override;
  void send_skip(int64_t id, int64_t j, Message m) override;
  Message recv_skip_grad(int64_t id, int64_t j) override;
  void send_skip_grad(int64_t id, int64_t j, Message m) override;

  /// The messages this rank will receive in the pass, in order; posts the
  /// first receives of each direction.
  void begin_pass(const std::vector<Cell>& cells, bool forward, bool backward);

  /// After a pass that every rank completed: raises the capacities of the
  /// links of the pass's directions to the largest message of the step.
  void grow_capacities(bool forward, bool backward) const;

  // By the message's key (Route).
  bool was_sent(bool backward, int64_t key) const {
    return sent_.count({backward, key}) != 0;
  }
  bool was_received(bool backward, int64_t key) const {
    return received_.count({backward, key}) != 0;
  }

  // The failure protocol's two halves.
  /// Tells `dst`, in place of the message `key`, that `origin` failed
  /// (`broken`: its transport is in an unknown state) with `text`. False
  /// when the peer is unreachable (then it is marked bad).
  bool send_poison(int64_t dst, int64_t key, bool backward, int64_t origin,
                   bool broken, const std::string& text);
  /// Receives a message still owed and drops it; false when the peer is
  /// unreachable (then it is marked bad).
  bool drain(int64_t src, int64_t key, bool backward);

  FailKind kind = FailKind::kNone;
  int64_t origin = -1;       // kPeer: the rank that failed first
  bool peer_broken = false;  // kPeer: its transport is in an unknown state
  std::string peer_text;     // kPeer: its error
  int64_t lost_peer = -1;    // kComm: the first peer this rank lost

 private:
  static constexpr int kPrepost = 2;

  struct Posted {
    torch::Tensor buffer;
    c10::intrusive_ptr<c10d::Work> work;
  };

  c10::Device device() const { return link_.device(); }
  // The rank a direction's messages come from (activations from the
  // previous rank, gradients from the next, around the ring when
  // interleaved).
  int64_t peer(bool backward) const {
    const int64_t k = link_.world();
    return (link_.rank() + (backward ? 1 : k - 1)) % k;
  }
  // The message across boundary e (between stages e and e + 1).
  int64_t key_of(int64_t e, int64_t j) const {
    return e / link_.world() * chunks_ + j;
  }
  // "micro-batch j" of the message `key` (received or sent), and the
  // stages it goes between when they are not the ranks.
  std::string describe_key(int64_t key, bool backward, bool incoming) const;
  // "receiving <what> of <describe_key> from rank <src>".
  std::string receiving(int64_t key, bool backward, int64_t src) const;
  bool is_bad(int64_t peer) const { return bad_peers_.count(peer) != 0; }

  // A peer's poison came instead of a message `what`: the step fails as
  // kPeer, with the origin's error.
  [[noreturn]] void poisoned(Poison p, const std::string& what);
  // The link to `peer` failed (its error is being raised): the step fails
  // as kComm, unless a peer's poison came first, and nothing more is sent
  // to or taken from that peer.
  void lost(int64_t peer);
  [[noreturn]] void comm_failure(int64_t peer, const std::string& msg);
  // Runs `op` on the link to `peer`; its error (the backend's, a timeout)
  // is the link's loss.
  template <typename Op>
  auto on_link(int64_t peer, Op&& op) {
    try {
      return op();
    } catch (...) {
      lost(peer);
      throw;
    }
  }

  // The link's operations, for this step (the errors name it).
  c10::intrusive_ptr<c10d::Work> post_recv(const torch::Tensor& buffer, int64_t src,
                                           int tag, const std::string& what);
  void wait(const c10::intrusive_ptr<c10d::Work>& work, int64_t peer,
            const std::string& what);
  void post(const torch::Tensor& t, int64_t dst, int tag, const std::string& what);
  // Posts an encoded batch: packed into one message of `cap` bytes when it
  // fits, else the header then the payload (a spill).
  void post_encoded(Encoded& e, int64_t cap, int64_t dst, int tag,
                    const std::string& what);
  // A receive buffer of the link's capacity, posted for the message `key`.
  Posted post_receive(int64_t src, int64_t key, bool backward,
                      const std::string& what);
  void post_next(bool backward);

  // Sends are not waited for here (with 1F1B neighbours send to each other
  // at once, and a Gloo send completes only when the peer receives); the
  // pass waits for them at its end.
  void send(int64_t dst, int64_t key, bool backward, const Batch& tensors,
            const std::vector<int64_t>& shared = {});
  Message recv(int64_t src, int64_t key, bool backward, bool discard);
  // The payload of a received message `h`: in the receive buffer, copied
  // out of it, or received as a second message. Returns it and its offset.
  std::pair<torch::Tensor, int64_t> payload_of(const Posted& posted, const Head& h,
                                               int64_t src, int tag,
                                               const std::string& what);

  // Skip `id`'s tensor of micro-batch j (`grad`: its gradient), on the
  // skip's own tag.
  void send_skip_message(int64_t id, int64_t j, bool grad, const Message& m);
  Message recv_skip_message(int64_t id, int64_t j, bool grad);
  static std::string skip_what(int64_t id, int64_t j, bool grad);
  // A received message's header region on the CPU.
  torch::Tensor head_of(const torch::Tensor& buffer) const;
  // Raises for a poison notice, a malformed header or another step's
  // message (`step_hint` ends that error).
  void check_head(const torch::Tensor& head, const Head& h, int64_t src,
                  const std::string& what, const char* step_hint);
  // The tensors of a checked message (its payload packed or spilled).
  Message decode(const Posted& posted, const torch::Tensor& head, const Head& h,
                 int64_t src, int tag, const std::string& what);
  int64_t skip_rank(int64_t id, bool popper) const;

  Link& link_;
  int64_t seq_;
  int64_t stages_;
  int64_t chunks_;
  const std::vector<int64_t>* skip_routes_;
  std::set<std::pair<bool, int64_t>> sent_;
  std::set<std::pair<bool, int64_t>> received_;
  std::set<int64_t> bad_peers_;
  std::vector<int64_t> expected_[2];
  size_t next_[2] = {0, 0};
  std::map<std::pair<bool, int64_t>, Posted> posted_;
  int64_t largest_sent_[2] = {0, 0};
  int64_t largest_received_[2] = {0, 0};
};

} // namespace pipegear::detail
