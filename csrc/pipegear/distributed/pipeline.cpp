// The distributed executor: this rank's row of the schedule on the calling
// thread, with the in-process engine's CellRunner and a transport over c10d
// point-to-point messages. Protocol and failure handling: docs/distributed.md.
#include <pipegear/distributed/pipeline.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <utility>

#include <torch/autograd.h>
#include <torch/cuda.h>

#include <pipegear/detail/cells.h>
#include <pipegear/detail/pipeline_node.h>
#include <pipegear/gpipe.h>
#include <pipegear/microbatch.h>
#include <pipegear/nn/deferred_batch_norm.h>
#include <pipegear/detail/random.h>
#include <pipegear/schedule.h>

namespace pipegear {
namespace detail {
namespace {

// Message kinds (the first word of a message, see C10dTransport).
constexpr int64_t kPacked = 1;
constexpr int64_t kSpill = 2;
constexpr int64_t kPoison = -1;
// Added to a message's tensor count for a tuple of one tensor.
constexpr int64_t kOneTuple = int64_t{1} << 32;
// The largest message header; the fixed message size with NCCL.
constexpr int64_t kHeaderBytes = 8192;
// The initial capacity of a Gloo link (see C10dTransport).
constexpr int64_t kMinCapacity = 64 * 1024;
// Tags. Every pipeline built on a group gets its own range (see
// DistributedCore::tag): micro-batch j sends 2j (activations) and 2j + 1
// (gradients); then the step header (rank 0 to every rank), the agreement
// at the end of a pass (every rank to rank 0, rank 0 to every rank) and the
// arrival at a step (every rank to rank 0). A receive posted early by a
// pipeline that is then destroyed stays posted in Gloo; with its own tags
// it cannot swallow a later pipeline's messages.
enum TagKind : int64_t {
  kTagHeader = 0,
  kTagStatus = 1,
  kTagOutcome = 2,
  kTagArrival = 3,
  kTagKinds = 4
};

// The step header (rank 0 to every rank), int64 words: kHeadWords fixed
// ones (see DistributedCore::begin), the M micro-batch sizes (room for
// `chunks`), then the text of a failure before the step, if any.
constexpr int64_t kHeadWords = 6;
// An arrival (every rank > 0 to rank 0): whether the rank failed before the
// step, the length of its error's text, then the text.
constexpr int64_t kArrivalWords = 2;
// The longest text of a failure in a header, an arrival or a poison message.
constexpr int64_t kNoteBytes = 4000;
constexpr int64_t kNoteWords = (kNoteBytes + 7) / 8;

// Writes `text`, cut to kNoteBytes, at `at`; returns the bytes written.
int64_t put_note(int64_t* at, const std::string& text) {
  const auto n = std::min<size_t>(text.size(), kNoteBytes);
  std::memcpy(at, text.data(), n);
  return static_cast<int64_t>(n);
}

std::string get_note(const int64_t* at, int64_t bytes) {
  return std::string(reinterpret_cast<const char*>(at),
                     static_cast<size_t>(std::clamp<int64_t>(bytes, 0, kNoteBytes)));
}

// Words to send of a buffer whose note (at word `note_at`) holds `bytes`.
int64_t words_with_note(int64_t note_at, int64_t bytes) {
  return note_at + (bytes + 7) / 8;
}

// Tags in use: [0, kTags).
constexpr int64_t kTags = int64_t{1} << 30;

// The tag ranges of the pipelines built on a group in this process lie one
// after another (wrapping around at kTags): each range is as long as its
// pipeline's chunks make it, so placing range n at n times its own length
// would overlap an earlier pipeline's range when the chunks differ (and a
// stale early receive of the earlier one take its messages). Every rank builds
// the same pipelines on a group in the same order (construction is
// collective; agree_on_configuration compares the first tags), so the
// ranges agree; a construction that fails the comparison takes none.
std::mutex& tag_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::map<const void*, int64_t>& next_tags() {
  static std::map<const void*, int64_t> next;
  return next;
}

// The first tag of a new range of `length` tags on `group`.
int64_t free_tags(const void* group, int64_t length) {
  std::lock_guard<std::mutex> lock(tag_mutex());
  const int64_t base = next_tags()[group];
  return base + length > kTags ? 0 : base;
}

void take_tags(const void* group, int64_t base, int64_t length) {
  std::lock_guard<std::mutex> lock(tag_mutex());
  next_tags()[group] = base + length;
}

std::string describe(const std::exception_ptr& e) {
  if (!e) {
    return "an unknown error";
  }
  try {
    std::rethrow_exception(e);
  } catch (const c10::Error& err) {
    return err.what_without_backtrace();
  } catch (const std::exception& err) {
    return err.what();
  } catch (...) {
    return "an exception of unknown type";
  }
}

// A rank's error as the other ranks quote it: a typed c10 error (a user's
// mistake) with the name Python gives its type, as a Python exception's
// text has it already ("ValueError: ...").
std::string describe_failure(const std::exception_ptr& e) {
  if (!e) {
    return describe(e);
  }
  try {
    std::rethrow_exception(e);
  } catch (const c10::ValueError& err) {
    return std::string("ValueError: ") + err.what_without_backtrace();
  } catch (const c10::TypeError& err) {
    return std::string("TypeError: ") + err.what_without_backtrace();
  } catch (const c10::IndexError& err) {
    return std::string("IndexError: ") + err.what_without_backtrace();
  } catch (...) {
    return describe(e);
  }
}

// Why a link to `peer` fails at once: Gloo closes every link of a process
// when one of its waits times out (and all of them when it dies).
std::string closed_by(int64_t peer) {
  return " (did rank " + std::to_string(peer) +
      " die, or time out waiting for a rank?)";
}

std::string seconds(std::chrono::milliseconds t) {
  std::ostringstream s;
  s << static_cast<double>(t.count()) / 1000.0 << " s";
  return s.str();
}

enum class Face : int64_t { kStep = 1, kModule = 2 };

const char* face_name(int64_t f) {
  return f == static_cast<int64_t>(Face::kStep) ? "step()" : "forward()";
}

struct PendingSend {
  c10::intrusive_ptr<c10d::Work> work;
  int64_t peer;
  std::string what;
};


// How a wait on a c10d Work ended.
struct WaitResult {
  bool done = false;
  std::string error;  // what the backend raised instead, if anything
  bool ok() const { return done && error.empty(); }
  // A timeout: no completion and no error, or the backend's own timeout
  // error (Gloo: "Timed out ...", others "...timeout...").
  bool timed_out() const {
    return !done && (error.empty() || error.find("imed out") != std::string::npos ||
                     error.find("imeout") != std::string::npos);
  }
};

WaitResult wait_work(const c10::intrusive_ptr<c10d::Work>& work,
                     std::chrono::milliseconds timeout) {
  try {
    return {work->wait(timeout), std::string()};
  } catch (const c10::Error& e) {
    return {false, e.what_without_backtrace()};
  } catch (const std::exception& e) {
    return {false, e.what()};
  }
}

} // namespace

// Why the current step failed, as seen by this rank's transport.
enum class FailKind : uint8_t {
  kNone,
  kPeer,  // a peer's poison message: it failed and told us
  kComm,  // a timeout, a lost connection or a garbled message
};

struct StepState;

class DistributedCore : public std::enable_shared_from_this<DistributedCore> {
 public:
  DistributedCore(c10::intrusive_ptr<c10d::ProcessGroup> group,
                  std::shared_ptr<Stage> stage, torch::nn::Sequential module,
                  DistributedOptions options);

  // `local_error`: this rank's mistake found before the step, if any: every
  // rank's call throws at once (see begin).
  torch::Tensor step(const Batch& input, const Batch& target,
                     const LossFn& loss_fn, const StepOptions& options,
                     std::exception_ptr local_error = nullptr);
  Batch forward(const Batch& input, bool training,
                std::exception_ptr local_error = nullptr);
  void backward();
  // Module style, the drain pass of `state` (from the autograd node).
  Batch drain(StepState& state, const Batch& grads);
  // Module style: a forward() while the drain of `state` has not run. The
  // peers wait for this rank in that drain, not in a next step: fails the
  // drain as a failing backward would, so that they raise at once, then
  // raises `error`. A later backward through the old output raises.
  [[noreturn]] void abandon_drain(StepState& state, const std::exception_ptr& error);

  int64_t rank() const { return rank_; }
  int64_t world() const { return world_; }
  const DistributedOptions& options() const { return options_; }
  const std::shared_ptr<Stage>& stage() const { return stage_; }
  torch::nn::Sequential module() const { return module_; }
  bool broken() const {
    std::lock_guard<std::mutex> lock(state_mutex_);
    return broken_;
  }
  std::vector<TraceEvent> last_events() const {
    std::lock_guard<std::mutex> lock(state_mutex_);
    return events_;
  }

  // ---- used by the transport -------------------------------------------
  c10d::ProcessGroup& group() { return *group_; }
  c10::Device comm_device() const { return comm_device_; }
  bool nccl() const { return nccl_; }
  int tag_of(int64_t j, bool backward) const {
    return static_cast<int>(tag_base_ + 2 * j + (backward ? 1 : 0));
  }
  int tag(TagKind kind) const {
    return static_cast<int>(tag_base_ + 2 * options_.chunks() + kind);
  }
  // The capacity of this rank's link in a direction (see C10dTransport).
  int64_t capacity(bool backward, bool send) const {
    if (nccl_) {
      return kHeaderBytes;
    }
    return send ? send_capacity_[backward] : recv_capacity_[backward];
  }
  std::chrono::milliseconds timeout() const { return options_.timeout(); }
  void add_pending(PendingSend p) { pending_.push_back(std::move(p)); }
  // Surfaces failed sends among those already completed; keeps the others.
  void prune_pending();
  // Waits for every send in flight (each bounded by the timeout).
  void flush_pending();

 private:
  friend class C10dTransport;

  // The start of a step: every rank > 0 sends rank 0 its arrival (with
  // `local_error`, its failure before the step, if any); rank 0 waits for
  // all of them (idle_timeout), then sends every rank the step header: the
  // step, the call (step or forward), the grad mode, the micro-batch sizes,
  // or that the step failed before it began (rank 0's `local_error` or bad
  // input, or the first failed arrival, with its text), which every rank
  // then raises. A rank whose own call disagrees with the header (another
  // call, step or grad mode) keeps the error in the state's pre_error and
  // fails the step (fail_early). Returns the state of the step.
  std::shared_ptr<StepState> begin(Face face, bool training, const Batch& input,
                                   std::exception_ptr local_error);
  // A rank whose call disagrees with the header fails the first pass of
  // the step the way rank 0 runs it, then raises.
  [[noreturn]] void fail_early(StepState& state);
  // Runs this rank's cells of the pass; on failure runs the failure
  // protocol and returns the error.
  std::exception_ptr run_cells(StepState& state, bool forward, bool backward);
  // After a failure in a pass: poisons every message of the pass this rank
  // still owes, receives (and drops) every one it is still owed, so that
  // no message stays unmatched. Marks the pipeline broken when the
  // transport is in an unknown state (a timeout, a lost peer).
  void fail(StepState& state, const std::exception_ptr& error, bool forward,
            bool backward);
  // The end of a pass: every rank tells rank 0 whether its pass failed
  // (the last rank adds the loss), rank 0 tells every rank the outcome, so
  // that all of them raise, or none. Rethrows `error` if set; returns the
  // loss (value, dtype) relayed by rank 0. A broken rank only tells, best
  // effort, and raises.
  std::pair<double, int64_t> agree(StepState& state, const std::exception_ptr& error,
                                   const torch::Tensor& loss, const char* pass);
  void post_agreement(StepState& state);
  // Module style: agree, then raise the capacities and wait for the sends.
  void finish_pass(StepState& state, const std::exception_ptr& error,
                   const char* pass);
  // Every c10d call of the core goes through these: an error of the backend
  // (Gloo: "Connection closed by peer" on a link a peer gave up on) is raised
  // with this rank and `what` it was about ("the header of step 3"),
  // and marks the pipeline broken, since the link is then in an unknown
  // state.
  c10::intrusive_ptr<c10d::Work> p2p_recv(const torch::Tensor& t, int64_t src, int tag,
                                          const std::string& what);
  void p2p_send(const torch::Tensor& t, int64_t dst, int tag, const std::string& what);
  [[noreturn]] void comm_error(const std::string& doing, int64_t peer);
  void post_header_recv();
  int64_t header_words() const { return kHeadWords + options_.chunks() + kNoteWords; }
  // Rank 0: every other rank's arrival at a step (see begin).
  struct Arrivals {
    int64_t failed = -1;   // the first rank that failed before the step
    std::string text;      // its error
    int64_t missing = -1;  // the first rank that did not come (now broken)
    std::string why;       // the error: idle_timeout passed, or the backend's
  };
  // Waits until every rank > 0 has sent its arrival at step `seq`, all
  // within idle_timeout; stops at the first that does not come.
  Arrivals await_arrivals(int64_t seq);
  void post_arrival_recvs();
  void post_arrival_recv(int64_t r, int64_t seq);
  void mark_broken(const std::string& why);
  std::string broken_reason() const {
    std::lock_guard<std::mutex> lock(state_mutex_);
    return broken_reason_;
  }
  void check_not_broken();
  void agree_on_configuration();
  // A sum over the ranks, bounded by the timeout inside the backend too (a
  // collective stuck on a dead peer would block the group's worker).
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& v,
                                           const std::string& what) {
    c10d::AllreduceOptions o;
    o.timeout = options_.timeout();
    try {
      return group_->allreduce(v, o);
    } catch (const std::exception&) {
      comm_error(what, -1);
    }
  }

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  std::shared_ptr<Stage> stage_;
  torch::nn::Sequential module_;
  DistributedOptions options_;
  int64_t rank_ = 0;
  int64_t world_ = 1;
  bool nccl_ = false;
  int64_t tag_base_ = 0;
  c10::Device comm_device_{c10::kCPU};
  CellRunner runner_;

  std::mutex call_mutex_;  // one call (step, forward, drain) at a time
  int64_t seq_ = 0;        // steps started, equal on every rank
  std::vector<PendingSend> pending_;
  std::weak_ptr<StepState> undrained_;  // module style: fill done, drain not
  torch::Tensor next_header_;           // ranks > 0: the next step header's
  c10::intrusive_ptr<c10d::Work> next_header_work_;  // receive, posted early
  std::vector<torch::Tensor> arrival_;  // rank 0: every rank's next arrival's
  std::vector<c10::intrusive_ptr<c10d::Work>> arrival_work_;  // receive (by rank)
  torch::Tensor placeholder_;           // module style: for backward()

  // Link capacities (Gloo), raised after every pass all ranks completed.
  int64_t send_capacity_[2] = {kMinCapacity, kMinCapacity};
  int64_t recv_capacity_[2] = {kMinCapacity, kMinCapacity};
  void raise_capacities(const StepState& state, bool forward, bool backward);

  mutable std::mutex state_mutex_;
  bool broken_ = false;
  std::string broken_reason_;
  std::vector<TraceEvent> events_;
};

// Moves Messages between this rank and its neighbours.
//
// A message is one uint8 buffer: a header of int64 words, then, at the next
// 64-byte boundary, the payload (every defined, non-empty tensor,
// contiguous, each at a 64-byte aligned offset):
//
//   w[0] kind: kPacked (payload follows in this buffer), kSpill (payload in
//        a second message of exactly w[3] bytes), kPoison (a peer failed)
//   w[1] step   w[2] header words H   w[3] payload bytes
//   w[4] tensors (+ kOneTuple for a tuple of one tensor), then per tensor:
//        defined [dtype, requires_grad, ndim,
//        sizes..., offset, bytes]
//   poison: w[3] text bytes (after the header), w[4] origin, w[5] broken
//
// The receiver posts each receive ahead of time (Gloo: a window of
// kPrepost messages per direction, at the start of the pass) with a
// *capacity*: Gloo accepts a message shorter than the receive. Both ends
// know the capacity of a link without talking: kMinCapacity, raised after
// every pass that all ranks completed to the largest message of the link
// so far. A message that fits (the steady state: same shapes every step)
// travels whole, as soon as it is sent, while the receiver computes; one
// that does not spills its payload into a second message, received once
// the header has told its size. NCCL matches messages by posting order and
// exact size, so there the capacity is fixed (kHeaderBytes, messages
// padded to it) and nothing is posted early.
//
// The transport remembers which messages of the step went out and came in,
// so that the failure protocol knows what is still owed.
class C10dTransport final : public Transport {
 public:
  C10dTransport(DistributedCore& core, int64_t seq) : core_(core), seq_(seq) {}

  ~C10dTransport() override = default;

  // A message counts as received (not owed any more) once its receive
  // starts: a poison message is received too, and after a transport error
  // the peer is not drained anyway.
  Message recv_forward(int64_t s, int64_t j) override {
    received_.insert({false, j});
    return recv(s - 1, j, false, false);
  }
  void send_forward(int64_t s, int64_t j, Message m) override {
    sent_.insert({false, j});
    send(s + 1, j, false, m.tensors);
  }
  Message recv_backward(int64_t s, int64_t j) override {
    received_.insert({true, j});
    return recv(s + 1, j, true, false);
  }
  void send_backward(int64_t s, int64_t j, Message m) override {
    sent_.insert({true, j});
    send(s - 1, j, true, m.tensors);
  }

  bool was_sent(bool backward, int64_t j) const {
    return sent_.count({backward, j}) != 0;
  }
  bool was_received(bool backward, int64_t j) const {
    return received_.count({backward, j}) != 0;
  }
  bool is_bad(int64_t peer) const { return bad_peers_.count(peer) != 0; }

  // The messages this rank will receive in the pass, in order; posts the
  // first receives of each direction.
  void begin_pass(const std::vector<Cell>& cells, bool forward, bool backward) {
    const int64_t rank = core_.rank();
    const bool last = rank + 1 == core_.world();
    for (int d = 0; d < 2; ++d) {
      expected_[d].clear();
      next_[d] = 0;
    }
    for (const auto& c : cells) {
      const bool bwd = c.phase == Phase::kBackward;
      if (bwd ? backward && !last : forward && rank > 0) {
        expected_[bwd].push_back(c.micro_batch);
      }
    }
    if (!core_.nccl()) {
      for (int d = 0; d < 2; ++d) {
        for (int i = 0; i < kPrepost; ++i) {
          post_next(d != 0);
        }
      }
    }
  }

  // The largest message of each direction in the step, for the capacities.
  int64_t largest_sent(bool backward) const { return largest_sent_[backward]; }
  int64_t largest_received(bool backward) const {
    return largest_received_[backward];
  }

  // The failure protocol's two halves.
  // False when the peer is unreachable (then it is marked bad).
  bool send_poison(int64_t dst, int64_t j, bool backward, int64_t origin,
                   bool broken, const std::string& text) {
    sent_.insert({backward, j});
    if (is_bad(dst)) {
      return false;
    }
    try {
      const int64_t cap = core_.capacity(backward, /*send=*/true);
      std::vector<int64_t> w{kPoison, seq_, 6, 0, origin, broken ? 1 : 0};
      const int64_t base = align64(8 * static_cast<int64_t>(w.size()));
      const std::string msg = text.substr(
          0, static_cast<size_t>(std::max<int64_t>(0, std::min<int64_t>(
                                                         cap - base, kNoteBytes))));
      w[3] = static_cast<int64_t>(msg.size());
      auto buffer = torch::zeros({core_.nccl() ? cap : base + w[3]}, torch::kUInt8);
      std::memcpy(buffer.data_ptr<uint8_t>(), w.data(), 8 * w.size());
      std::memcpy(buffer.data_ptr<uint8_t>() + base, msg.data(), msg.size());
      post(buffer.to(device()), dst, core_.tag_of(j, backward), "a failure notice");
      return true;
    } catch (const std::exception&) {
      bad_peers_.insert(dst);  // the peer is gone: nothing to tell it
      return false;
    }
  }

  // Receives a message still owed and drops it; false when the peer is
  // unreachable (then it is marked bad).
  bool drain(int64_t src, int64_t j, bool backward) {
    received_.insert({backward, j});
    if (is_bad(src)) {
      return false;
    }
    try {
      recv(src, j, backward, /*discard=*/true);
      return true;
    } catch (const std::exception&) {
      bad_peers_.insert(src);
      return false;
    }
  }

  FailKind kind = FailKind::kNone;
  int64_t origin = -1;       // kPeer: the rank that failed first
  bool peer_broken = false;  // kPeer: its transport is in an unknown state
  std::string peer_text;     // kPeer: its error

 private:
  static constexpr int kPrepost = 2;

  struct Posted {
    torch::Tensor buffer;
    c10::intrusive_ptr<c10d::Work> work;
  };

  c10::Device device() const { return core_.comm_device(); }
  int64_t peer(bool backward) const {
    return backward ? core_.rank() + 1 : core_.rank() - 1;
  }

  void post_next(bool backward) {
    auto& list = expected_[backward];
    auto& next = next_[backward];
    if (next >= list.size()) {
      return;
    }
    const int64_t j = list[next++];
    const int64_t src = peer(backward);
    if (is_bad(src)) {
      return;
    }
    auto buffer = torch::empty({core_.capacity(backward, /*send=*/false)},
                               torch::TensorOptions().dtype(torch::kUInt8).device(device()));
    posted_[{backward, j}] = {buffer, post_recv(buffer, src, core_.tag_of(j, backward),
                                                "receiving " + describe_msg(backward, j, src))};
  }

  static std::string describe_msg(bool backward, int64_t j, int64_t peer) {
    return std::string(backward ? "the gradients" : "the activations") +
        " of micro-batch " + std::to_string(j) + " from rank " +
        std::to_string(peer);
  }

  // " in step N", for the messages of a failure of the transport.
  std::string in_step() const { return " in step " + std::to_string(seq_); }

  [[noreturn]] void comm_failure(int64_t peer, const std::string& msg) {
    if (kind == FailKind::kNone) {
      kind = FailKind::kComm;
    }
    bad_peers_.insert(peer);
    TORCH_CHECK(false, msg);
  }

  void wait(const c10::intrusive_ptr<c10d::Work>& work, int64_t peer,
            const std::string& what) {
    const auto timeout = core_.timeout();
    const WaitResult r = wait_work(work, timeout);
    const std::string& error = r.error;
    if (r.timed_out()) {
      comm_failure(peer, "pipegear: rank " + std::to_string(core_.rank()) +
                             ": " + what + in_step() + " timed out after " +
                             seconds(timeout) + " (did rank " +
                             std::to_string(peer) +
                             " die, hang or skip the call?)" +
                             (error.empty() ? "" : ": " + error));
    }
    if (!error.empty()) {
      comm_failure(peer, "pipegear: rank " + std::to_string(core_.rank()) +
                             ": " + what + in_step() + " failed" + closed_by(peer) +
                             ": " + error);
    }
  }

  void post(torch::Tensor t, int64_t dst, int tag, const std::string& what) {
    std::vector<at::Tensor> v{std::move(t)};
    c10::intrusive_ptr<c10d::Work> work;
    try {
      work = core_.group().send(v, static_cast<int>(dst), tag);
    } catch (const std::exception&) {
      comm_failure(dst, "pipegear: rank " + std::to_string(core_.rank()) +
                            ": sending " + what + " to rank " +
                            std::to_string(dst) + in_step() + " failed" +
                            closed_by(dst) + ": " + describe(std::current_exception()));
    }
    core_.add_pending({std::move(work), dst,
                       what + " to rank " + std::to_string(dst) + in_step()});
  }

  c10::intrusive_ptr<c10d::Work> post_recv(torch::Tensor t, int64_t src, int tag,
                                           const std::string& what) {
    std::vector<at::Tensor> v{std::move(t)};
    try {
      return core_.group().recv(v, static_cast<int>(src), tag);
    } catch (const std::exception&) {
      comm_failure(src, "pipegear: rank " + std::to_string(core_.rank()) + ": " +
                            what + in_step() + " failed" + closed_by(src) + ": " +
                            describe(std::current_exception()));
    }
  }

  // Sends are not waited for here (with 1F1B neighbours send to each other
  // at once, and a Gloo send completes only when the peer receives); the
  // pass waits for them at its end.
  void send(int64_t dst, int64_t j, bool backward, const Batch& tensors) {
    const std::string what = std::string(backward ? "the gradients"
                                                  : "the activations") +
        " of micro-batch " + std::to_string(j);
    core_.prune_pending();
    std::vector<int64_t> w{kPacked, seq_, 0, 0,
                           static_cast<int64_t>(tensors.size()) +
                               (tensors.size() == 1 && tensors.tuple ? kOneTuple : 0)};
    std::vector<std::pair<torch::Tensor, int64_t>> parts;  // tensor, offset
    int64_t payload = 0;
    for (const auto& t : tensors) {
      w.push_back(t.defined() ? 1 : 0);
      if (!t.defined()) {
        continue;
      }
      w.push_back(static_cast<int64_t>(t.scalar_type()));
      w.push_back(t.requires_grad() ? 1 : 0);
      w.push_back(t.dim());
      for (auto d : t.sizes()) {
        w.push_back(d);
      }
      const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
      w.push_back(payload);
      w.push_back(bytes);
      if (bytes > 0) {
        parts.emplace_back(t.detach(), payload);
        payload = align64(payload + bytes);
      }
    }
    const auto words = static_cast<int64_t>(w.size());
    const int64_t base = align64(8 * words);
    TORCH_CHECK_VALUE(base <= kHeaderBytes, "pipegear: a stage output of ",
                      tensors.size(), " tensors is too long to describe in ",
                      kHeaderBytes, " bytes; pass fewer tensors between stages");
    w[2] = words;
    w[3] = payload;
    const int64_t total = base + payload;
    largest_sent_[backward] = std::max(largest_sent_[backward], total);
    const int64_t cap = core_.capacity(backward, /*send=*/true);
    const bool packed = total <= cap;
    w[0] = packed ? kPacked : kSpill;
    const auto u8 = torch::TensorOptions().dtype(torch::kUInt8).device(device());
    // The header region (and the payload, when packed), built on the CPU
    // side when the tensors are there, else on the device.
    const int64_t first = core_.nccl() ? cap : (packed ? total : base);
    auto head = torch::empty({first}, torch::kUInt8);
    std::memset(head.data_ptr<uint8_t>(), 0,
                static_cast<size_t>(core_.nccl() ? first : base));
    std::memcpy(head.data_ptr<uint8_t>(), w.data(), 8 * w.size());
    torch::Tensor message = device().is_cpu() ? head : head.to(device());
    torch::Tensor spill;
    if (!packed) {
      spill = torch::empty({payload}, u8);
    }
    for (auto& [t, offset] : parts) {
      torch::Tensor& target = packed ? message : spill;
      const int64_t at = packed ? base + offset : offset;
      torch::from_blob(target.data_ptr<uint8_t>() + at, t.sizes(),
                       t.options().device(target.device()))
          .copy_(t);
    }
    const int tag = core_.tag_of(j, backward);
    post(message, dst, tag, what);
    if (!packed) {
      post(spill, dst, tag, what);
    }
  }

  static int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

  Message recv(int64_t src, int64_t j, bool backward, bool discard) {
    const std::string what = "receiving " + describe_msg(backward, j, src);
    const int tag = core_.tag_of(j, backward);
    Posted posted;
    auto it = posted_.find({backward, j});
    if (it != posted_.end()) {
      posted = std::move(it->second);
      posted_.erase(it);
    } else {
      auto buffer = torch::empty({core_.capacity(backward, /*send=*/false)},
                                 torch::TensorOptions().dtype(torch::kUInt8).device(device()));
      posted = {buffer, post_recv(buffer, src, tag, what)};
    }
    wait(posted.work, src, what);
    if (!core_.nccl()) {
      post_next(backward);  // keep the window full
    }
    const torch::Tensor buffer = posted.buffer;
    const torch::Tensor head = device().is_cpu()
        ? buffer
        : buffer.narrow(0, 0, std::min<int64_t>(kHeaderBytes, buffer.numel())).cpu();
    const auto* w = reinterpret_cast<const int64_t*>(head.data_ptr<uint8_t>());
    const int64_t capacity_words = head.numel() / 8;
    if (w[0] == kPoison) {
      const int64_t base = align64(8 * 6);
      const int64_t nbytes = std::max<int64_t>(
          0, std::min<int64_t>(w[3], head.numel() - base));
      if (discard) {
        return {};
      }
      kind = FailKind::kPeer;
      origin = w[4];
      peer_broken = w[5] != 0;
      peer_text.assign(reinterpret_cast<const char*>(head.data_ptr<uint8_t>()) + base,
                       static_cast<size_t>(nbytes));
      TORCH_CHECK(false, "pipegear: rank ", core_.rank(), ": rank ", origin,
                  " failed in step ", w[1], ", so this rank stops too (", what,
                  "): ", peer_text);
    }
    const int64_t words = w[2];
    if ((w[0] != kPacked && w[0] != kSpill) || words < 5 ||
        words > capacity_words) {
      comm_failure(src, "pipegear: rank " + std::to_string(core_.rank()) +
                            ": garbled message (kind " + std::to_string(w[0]) +
                            ", " + std::to_string(words) + " header words) while " +
                            what);
    }
    if (w[1] != seq_) {
      comm_failure(src, "pipegear: rank " + std::to_string(core_.rank()) +
                            ": " + what + ": got a message of step " +
                            std::to_string(w[1]) + " during step " +
                            std::to_string(seq_) +
                            " (module style: did every rank run the backward "
                            "of the previous forward?)");
    }
    const int64_t base = align64(8 * words);
    const int64_t payload = w[3];
    largest_received_[backward] = std::max(largest_received_[backward], base + payload);
    torch::Tensor data;  // the payload's bytes
    int64_t data_offset = 0;
    if (w[0] == kPacked && 2 * (base + payload) < buffer.numel()) {
      // Much smaller than the link's capacity (shapes shrank since a larger
      // step): a right-sized copy, so that a kept tensor (a checkpointed
      // stage input) does not hold the whole receive buffer.
      data = buffer.narrow(0, base, payload).clone();
    } else if (w[0] == kPacked) {
      data = buffer;
      data_offset = base;
    } else if (payload > 0) {
      data = torch::empty({payload},
                          torch::TensorOptions().dtype(torch::kUInt8).device(device()));
      wait(post_recv(data, src, tag, what), src, what);
    }
    if (discard) {
      return {};
    }
    Message m;
    size_t p = 5;
    auto next = [&]() {
      if (p >= static_cast<size_t>(words)) {
        comm_failure(src, "pipegear: rank " + std::to_string(core_.rank()) +
                              ": truncated message header while " + what);
      }
      return w[p++];
    };
    const bool one_tuple = w[4] == 1 + kOneTuple;
    const int64_t count = one_tuple ? 1 : w[4];
    m.tensors.tuple = one_tuple;
    for (int64_t i = 0; i < count; ++i) {
      if (next() == 0) {
        m.tensors.emplace_back();
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
      const auto options = torch::TensorOptions().dtype(dtype).device(device());
      torch::Tensor t;
      if (bytes == 0) {
        t = torch::empty(sizes, options);
      } else {
        if (!data.defined() || data_offset + offset + bytes > data.numel()) {
          comm_failure(src, "pipegear: rank " + std::to_string(core_.rank()) +
                                ": a tensor lies outside its message while " + what);
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
      m.tensors.push_back(std::move(t));
    }
    return m;
  }

  DistributedCore& core_;
  int64_t seq_;
  std::set<std::pair<bool, int64_t>> sent_;
  std::set<std::pair<bool, int64_t>> received_;
  std::set<int64_t> bad_peers_;
  std::vector<int64_t> expected_[2];
  size_t next_[2] = {0, 0};
  std::map<std::pair<bool, int64_t>, Posted> posted_;
  int64_t largest_sent_[2] = {0, 0};
  int64_t largest_received_[2] = {0, 0};
};

// Everything one step needs, from the header to the end of its last pass.
struct StepState {
  Face face = Face::kStep;
  int64_t seq = 0;
  StepRun run;
  Schedule schedule;
  std::unique_ptr<C10dTransport> transport;
  bool failed = false;
  int64_t origin = -1;  // the rank whose failure failed this step
  bool drained = false;
  bool abandoned = false;  // module style: a forward came before the drain
  std::exception_ptr pre_error;  // this rank's call disagrees with the header
  // The receives of the agreement of the current pass: rank 0, the status
  // of ranks 1..K-1; the others, rank 0's outcome. A receive that could not
  // be posted has no work and the backend's error instead.
  struct Report {
    torch::Tensor buffer;
    c10::intrusive_ptr<c10d::Work> work;
    std::string error;
  };
  std::vector<Report> agreement;
};

namespace {

void wait_collective(const c10::intrusive_ptr<c10d::Work>& work, int64_t rank,
                     std::chrono::milliseconds timeout, const std::string& what) {
  const WaitResult r = wait_work(work, timeout);
  TORCH_CHECK(r.ok(), "pipegear: rank ", rank, ": ", what,
              r.timed_out()
                  ? " timed out after " + seconds(timeout) +
                      " (a rank died, hangs or does not make the same call)"
                  : " failed: " + r.error);
}

c10::Device default_device(const c10d::ProcessGroup& group) {
  if (group.getBackendName() != "nccl") {
    return c10::Device(c10::kCPU);
  }
  const auto n = static_cast<int64_t>(torch::cuda::device_count());
  TORCH_CHECK_VALUE(n > 0, "an NCCL process group needs CUDA devices");
  int64_t index = group.getRank() % n;
  if (const char* local = std::getenv("LOCAL_RANK")) {
    index = std::atoll(local) % n;
  }
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
}

void check_group(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                 const DistributedOptions& options) {
  TORCH_CHECK_VALUE(group, "DistributedPipeline needs a process group, got null");
  const auto world = group->getSize();
  const auto& balance = options.balance();
  if (!balance.empty()) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(balance.size()) == world,
                      "balance has ", balance.size(), " stages but the process "
                      "group has ", world, " ranks: one rank per stage");
  }
}

// This rank's slice of `layers` (index `offset` on), named by index.
torch::nn::Sequential slice_of(const std::vector<int64_t>& balance, int64_t rank,
                               const std::function<torch::nn::AnyModule(int64_t)>& layer) {
  int64_t offset = 0;
  for (int64_t s = 0; s < rank; ++s) {
    offset += balance[s];
  }
  torch::nn::Sequential part;
  for (int64_t l = offset; l < offset + balance[rank]; ++l) {
    part->push_back(std::to_string(l), layer(l));
  }
  return part;
}

std::shared_ptr<Stage> make_stage(torch::nn::Sequential& part,
                                  const c10d::ProcessGroup& group,
                                  const DistributedOptions& options) {
  if (options.deferred_batch_norm()) {
    part = convert_deferred_batch_norm(part, options.chunks());
  }
  const auto device = options.device() ? *options.device() : default_device(group);
  part->to(device);
  const auto& balance = options.balance();
  int64_t first_layer = balance.empty() ? -1 : 0;
  for (int64_t r = 0; r < group.getRank() && r < static_cast<int64_t>(balance.size());
       ++r) {
    first_layer += balance[r];
  }
  return std::make_shared<SequentialStage>(part, device, first_layer);
}

} // namespace

// ---------------------------------------------------------------------------
DistributedCore::DistributedCore(c10::intrusive_ptr<c10d::ProcessGroup> group,
                                 std::shared_ptr<Stage> stage,
                                 torch::nn::Sequential module,
                                 DistributedOptions options)
    : group_(std::move(group)),
      stage_(std::move(stage)),
      module_(std::move(module)),
      options_(std::move(options)),
      runner_(stage_, group_ ? group_->getRank() : 0) {
  TORCH_CHECK_VALUE(group_, "DistributedPipeline needs a process group, got null");
  TORCH_CHECK_VALUE(stage_, "DistributedPipeline needs a stage, got null");
  register_random_kernels();
  TORCH_CHECK_VALUE(options_.chunks() >= 1, "chunks must be at least 1, got ",
                    options_.chunks());
  TORCH_CHECK_VALUE(options_.timeout().count() > 0,
                    "timeout must be positive, got ", options_.timeout().count(),
                    " ms");
  TORCH_CHECK_VALUE(options_.idle_timeout().count() > 0,
                    "idle_timeout must be positive, got ",
                    options_.idle_timeout().count(), " ms");
  rank_ = group_->getRank();
  world_ = group_->getSize();
  check_group(group_, options_);
  nccl_ = group_->getBackendName() == "nccl";
  if (nccl_) {
    TORCH_CHECK_VALUE(!stage_->device().is_cpu(), "rank ", rank_, ": an NCCL "
                      "process group needs the stage on a CUDA device, got ",
                      stage_->device());
    comm_device_ = stage_->device();
  }
  const int64_t stride = 2 * options_.chunks() + kTagKinds;
  TORCH_CHECK_VALUE(stride < kTags, "chunks must be below ", kTags / 2,
                    ", got ", options_.chunks());
  tag_base_ = free_tags(group_.get(), stride);
  agree_on_configuration();
  take_tags(group_.get(), tag_base_, stride);
  post_header_recv();
  post_arrival_recvs();
}

c10::intrusive_ptr<c10d::Work> DistributedCore::p2p_recv(const torch::Tensor& t,
                                                         int64_t src, int tag,
                                                         const std::string& what) {
  std::vector<at::Tensor> v{t};
  try {
    return group_->recv(v, static_cast<int>(src), tag);
  } catch (const std::exception&) {
    comm_error("posting the receive of " + what + " from rank " + std::to_string(src),
               src);
  }
}

void DistributedCore::p2p_send(const torch::Tensor& t, int64_t dst, int tag,
                               const std::string& what) {
  std::vector<at::Tensor> v{t};
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = group_->send(v, static_cast<int>(dst), tag);
  } catch (const std::exception&) {
    comm_error("sending " + what + " to rank " + std::to_string(dst), dst);
  }
  add_pending({std::move(work), dst, what + " to rank " + std::to_string(dst)});
}

// Called from a catch block: the backend's error, with what this rank was
// doing.
void DistributedCore::comm_error(const std::string& doing, int64_t peer) {
  const std::string error = describe(std::current_exception());
  mark_broken(doing + " failed: " + error);
  TORCH_CHECK(false, "pipegear: rank ", rank_, ": ", doing, " failed",
              peer < 0 ? std::string() : closed_by(peer), ": ", error);
}

// Ranks > 0 post the receive of the next step header as soon as the last one
// arrived, so that it travels without a hand-shake. Not with NCCL, which
// matches receives to sends in posting order: the header receive would take
// the next micro-batch.
void DistributedCore::post_header_recv() {
  next_header_work_.reset();
  if (rank_ == 0 || nccl_) {
    return;
  }
  next_header_ = torch::empty({header_words()},
                              torch::TensorOptions().dtype(torch::kInt64).device(comm_device_));
  next_header_work_ = p2p_recv(next_header_, 0, tag(kTagHeader),
                               "the header of step " + std::to_string(seq_));
}

// Rank 0 posts the receives of every rank's next arrival early, as the
// other ranks do the header's (Gloo only, for the same reason). A receive
// that cannot be posted is posted again, and its error raised with
// context, by await_arrivals.
void DistributedCore::post_arrival_recvs() {
  arrival_.assign(static_cast<size_t>(world_), torch::Tensor());
  arrival_work_.assign(static_cast<size_t>(world_), nullptr);
  if (rank_ != 0 || nccl_) {
    return;
  }
  for (int64_t r = 1; r < world_; ++r) {
    try {
      post_arrival_recv(r, seq_);
    } catch (const std::exception&) {
    }
  }
}

void DistributedCore::post_arrival_recv(int64_t r, int64_t seq) {
  arrival_[r] = torch::empty({kArrivalWords + kNoteWords},
                             torch::TensorOptions().dtype(torch::kInt64).device(comm_device_));
  arrival_work_[r] = nullptr;  // stays null if posting fails
  arrival_work_[r] = p2p_recv(arrival_[r], r, tag(kTagArrival),
                              "the arrival of rank " + std::to_string(r) + " at step " +
                                  std::to_string(seq));
}

DistributedCore::Arrivals DistributedCore::await_arrivals(int64_t seq) {
  using std::chrono::milliseconds;
  Arrivals out;
  const auto idle = options_.idle_timeout();
  const auto deadline = std::chrono::steady_clock::now() + idle;
  for (int64_t r = 1; r < world_; ++r) {
    const std::string waiting = "pipegear: rank 0: waiting for rank " +
        std::to_string(r) + " to start step " + std::to_string(seq);
    std::string why;
    try {
      if (!arrival_work_[r]) {
        post_arrival_recv(r, seq);
      }
      // The time left, at least 1 ms: c10d reads 0 as "the group's timeout".
      const auto left = std::max(
          milliseconds(1), std::chrono::duration_cast<milliseconds>(
                               deadline - std::chrono::steady_clock::now()));
      const WaitResult w = wait_work(arrival_work_[r], left);
      if (w.timed_out()) {
        why = waiting + " timed out after " + seconds(idle) + " (idle_timeout; did rank " +
            std::to_string(r) + " die, hang or skip the call?)";
      } else if (!w.ok()) {
        why = waiting + " failed" + closed_by(r) + ": " + w.error;
      }
    } catch (const std::exception&) {  // posting it failed
      why = describe(std::current_exception());
    }
    if (!why.empty()) {
      mark_broken(why);
      out.missing = r;
      out.why = why;
      return out;
    }
    const auto got = arrival_[r].cpu();
    const int64_t* a = got.data_ptr<int64_t>();
    if (a[0] != 0 && out.failed < 0) {
      out.failed = r;
      out.text = get_note(a + kArrivalWords, a[1]);
    }
    arrival_work_[r] = nullptr;
  }
  return out;
}

// Every rank must run the same K, chunks, checkpoint mode, schedule and
// balance: a mismatch would make ranks wait for messages that never come.
void DistributedCore::agree_on_configuration() {
  const int64_t width = 6 + world_;
  std::vector<int64_t> mine{tag_base_, world_, options_.chunks(),
                            static_cast<int64_t>(options_.checkpoint()),
                            static_cast<int64_t>(options_.schedule()),
                            static_cast<int64_t>(options_.balance().size())};
  for (int64_t s = 0; s < world_; ++s) {
    mine.push_back(s < static_cast<int64_t>(options_.balance().size())
                       ? options_.balance()[s]
                       : 0);
  }
  auto all = torch::zeros({world_ * width}, torch::kInt64);
  std::copy(mine.begin(), mine.end(), all.data_ptr<int64_t>() + rank_ * width);
  std::vector<at::Tensor> v{all.to(comm_device_)};
  const std::string what = "checking that every rank has the same options";
  wait_collective(allreduce(v, what), rank_, options_.timeout(), what);
  auto got = v[0].cpu();
  const int64_t* p = got.data_ptr<int64_t>();
  static const char* names[] = {"the first tag (after those of the pipelines "
                                "built on the group before this one)",
                                "world size", "chunks",
                                "checkpoint", "schedule", "balance length"};
  for (int64_t r = 0; r < world_; ++r) {
    for (int64_t f = 0; f < width; ++f) {
      if (p[r * width + f] != mine[f]) {
        const std::string field = f < 6 ? names[f]
                                        : "balance[" + std::to_string(f - 6) + "]";
        TORCH_CHECK_VALUE(false, "pipegear: ranks disagree on the pipeline: ",
                          field, " is ", mine[f], " on rank ", rank_, " but ",
                          p[r * width + f], " on rank ", r,
                          " (every rank must pass the same options)");
      }
    }
  }
}

void DistributedCore::prune_pending() {
  std::vector<PendingSend> still;
  for (auto& p : pending_) {
    if (!p.work->isCompleted()) {
      still.push_back(std::move(p));
      continue;
    }
    if (!p.work->isSuccess()) {
      mark_broken("sending " + p.what + " failed");
      TORCH_CHECK(false, "pipegear: rank ", rank_, ": sending ", p.what,
                  " failed: ", describe(p.work->exception()));
    }
  }
  pending_ = std::move(still);
}

void DistributedCore::flush_pending() {
  auto pending = std::move(pending_);
  pending_.clear();
  for (auto& p : pending) {
    try {
      wait_collective(p.work, rank_, options_.timeout(), "sending " + p.what);
    } catch (...) {
      mark_broken("sending " + p.what + " did not complete");
      throw;
    }
  }
}

void DistributedCore::mark_broken(const std::string& why) {
  std::lock_guard<std::mutex> lock(state_mutex_);
  if (!broken_) {
    broken_ = true;
    broken_reason_ = why;
  }
}

void DistributedCore::check_not_broken() {
  std::lock_guard<std::mutex> lock(state_mutex_);
  TORCH_CHECK(!broken_, "pipegear: rank ", rank_, ": an earlier step failed "
              "and left the process group in an unknown state (",
              broken_reason_, "); destroy the group and start again");
}

std::shared_ptr<StepState> DistributedCore::begin(Face face, bool training,
                                                  const Batch& input,
                                                  std::exception_ptr local_error) {
  check_not_broken();
  // Sends of an earlier step (a failed one) should all be through by now.
  flush_pending();
  auto state = std::make_shared<StepState>();
  const bool grad_mode = c10::GradMode::is_enabled();
  // The header: [step, call, grad mode, M (0: the step failed before it
  // began), the rank that failed before it + 1, bytes of its error's text,
  // sizes..., text].
  constexpr int64_t F = kHeadWords;
  const int64_t note_at = F + options_.chunks();
  std::vector<int64_t> sizes;
  const int64_t seq = seq_++;  // every rank counts the step, whatever happens
  const std::string step_n = "step " + std::to_string(seq);
  bool leader_grad = grad_mode;  // rank 0's grad mode
  if (rank_ == 0) {
    if (!local_error) {
      try {
        TORCH_CHECK_VALUE(!input.empty(), "rank 0 must pass the input, got none");
        sizes = scatter_input(state->run, input, options_.chunks());
      } catch (...) {
        local_error = std::current_exception();
      }
    }
    // Start only once every rank has: before that, a rank may be busy for
    // long (a checkpoint, an evaluation) without any peer timing out.
    const Arrivals arrivals = world_ > 1 ? await_arrivals(seq) : Arrivals{};
    // A rank that did not come: nobody to tell, since a timeout closes
    // every link of this process (Gloo), so the others fail at once.
    TORCH_CHECK(arrivals.missing < 0, arrivals.why);
    auto header = torch::zeros({header_words()}, torch::kInt64);
    auto* h = header.data_ptr<int64_t>();
    h[0] = seq;
    h[1] = static_cast<int64_t>(face);
    h[2] = grad_mode ? 1 : 0;
    int64_t origin = -1;
    std::string text;
    if (local_error) {
      origin = 0;
      text = describe_failure(local_error);
    } else if (arrivals.failed >= 0) {
      origin = arrivals.failed;
      text = arrivals.text;
    }
    h[3] = origin >= 0 ? 0 : static_cast<int64_t>(sizes.size());
    h[4] = origin + 1;
    h[5] = origin >= 0 ? put_note(h + note_at, text) : 0;
    std::copy(sizes.begin(), sizes.end(), h + F);
    // Gloo accepts a message shorter than its receive: only the words used.
    const auto sent = (nccl_ ? header : header.narrow(0, 0, words_with_note(note_at, h[5])))
                          .to(comm_device_);
    for (int64_t r = 1; r < world_; ++r) {
      p2p_send(sent, r, tag(kTagHeader), "the header of " + step_n);
    }
    post_arrival_recvs();
    if (origin >= 0) {
      // The ranks must hear of the failure even if this process ends as
      // soon as it raises (an exit closes the links with sends in flight).
      try {
        flush_pending();
      } catch (const std::exception&) {  // marked broken: raised next time
      }
    }
    if (local_error) {
      std::rethrow_exception(local_error);
    }
    TORCH_CHECK(arrivals.failed < 0, "pipegear: rank 0: rank ", arrivals.failed,
                " failed before ", step_n, " began: ", arrivals.text);
    state->face = face;
  } else {
    // Tell rank 0 this rank has come (and whether it failed already).
    auto arrival = torch::zeros({kArrivalWords + kNoteWords}, torch::kInt64);
    auto* a = arrival.data_ptr<int64_t>();
    a[0] = local_error ? 1 : 0;
    a[1] = local_error ? put_note(a + kArrivalWords, describe_failure(local_error)) : 0;
    p2p_send((nccl_ ? arrival : arrival.narrow(0, 0, words_with_note(kArrivalWords, a[1])))
                 .to(comm_device_),
             0, tag(kTagArrival), "this rank's arrival at " + step_n);
    if (!next_header_work_) {
      next_header_ = torch::empty({header_words()},
                                  torch::TensorOptions().dtype(torch::kInt64).device(comm_device_));
      next_header_work_ = p2p_recv(next_header_, 0, tag(kTagHeader), "the header of " + step_n);
    }
    auto got = next_header_;
    auto work = next_header_work_;
    // Rank 0 may be busy between steps for long: idle_timeout, not timeout.
    // Plus timeout: rank 0 waits idle_timeout for every rank to come; when
    // one does not, rank 0 is the one to time out and say which (the
    // others see their links to it close), not a rank that came early.
    const auto bound = options_.idle_timeout() + options_.timeout();
    const WaitResult r = wait_work(work, bound);
    if (!r.ok()) {
      const std::string why = "waiting for rank 0 to start " + step_n +
          (r.timed_out() ? " timed out after " + seconds(bound) +
                   " (idle_timeout + timeout; did rank 0 die, hang or skip the call?)"
                         : " failed" + closed_by(0) + ": " + r.error);
      mark_broken(why);
      TORCH_CHECK(false, "pipegear: rank ", rank_, ": ", why);
    }
    post_header_recv();
    auto hc = got.cpu();
    const int64_t* g = hc.data_ptr<int64_t>();
    if (g[3] == 0) {
      const int64_t origin = g[4] - 1;
      const std::string text = get_note(g + note_at, g[5]);
      if (local_error) {
        std::rethrow_exception(local_error);
      }
      TORCH_CHECK(false, "pipegear: rank ", rank_, ": rank ", origin,
                  " failed before ", step_n, " began: ", text);
    }
    TORCH_CHECK(g[3] >= 1 && g[3] <= options_.chunks(), "pipegear: rank ", rank_,
                ": bad micro-batch count ", g[3], " in the header of ", step_n);
    sizes.assign(g + F, g + F + g[3]);
    state->face = static_cast<Face>(g[1]);
    leader_grad = g[2] != 0;
    if (!local_error) {
      try {
        TORCH_CHECK(g[0] == seq, "pipegear: rank ", rank_, ": rank 0 is at step ",
                    g[0], " while this rank is at step ", seq,
                    "; a rank skipped a call");
        TORCH_CHECK(g[1] == static_cast<int64_t>(face), "pipegear: rank ", rank_,
                    ": rank 0 called ", face_name(g[1]), " while this rank called ",
                    face_name(static_cast<int64_t>(face)),
                    "; every rank must make the same call");
        TORCH_CHECK((g[2] != 0) == grad_mode, "pipegear: rank ", rank_,
                    ": grad mode is ", grad_mode ? "on" : "off", " here but ",
                    g[2] ? "on" : "off", " on rank 0; use torch.no_grad() / "
                    "NoGradGuard on every rank or none");
      } catch (...) {
        local_error = std::current_exception();
      }
    }
    state->pre_error = local_error;
  }
  // A graph is kept whenever grad mode is on (agreed above): whether some
  // stage needs one is not known on every rank without another exchange.
  const bool grad = rank_ == 0 ? grad_mode : leader_grad;
  state->seq = seq;
  prepare_run(state->run, world_, sizes, grad,
              call_checkpoint(options_.checkpoint(), training),
              at::ThreadLocalState());
  state->schedule = make_schedule(options_.schedule(), world_,
                                  static_cast<int64_t>(sizes.size()));
  state->transport = std::make_unique<C10dTransport>(*this, state->seq);
  return state;
}

void DistributedCore::fail_early(StepState& state) {
  const bool step = state.face == Face::kStep;
  if (!nccl_) {
    post_agreement(state);
  }
  fail(state, state.pre_error, /*forward=*/true, /*backward=*/step);
  agree(state, state.pre_error, torch::Tensor(), step ? "step" : "forward");
  std::rethrow_exception(state.pre_error);  // agree rethrows it already
}

std::exception_ptr DistributedCore::run_cells(StepState& state, bool forward,
                                              bool backward) {
  const auto& cells = state.schedule[rank_];
  auto& run = state.run;
  run.events[rank_].clear();
  std::exception_ptr error;
  try {
    if (!nccl_) {
      post_agreement(state);  // NCCL: in order, see agree()
    }
    state.transport->begin_pass(cells, forward, backward && run.grad);
    for (size_t i = 0; i < cells.size(); ++i) {
      runner_.run(run, *state.transport, cells, i, forward, backward);
    }
  } catch (...) {
    error = std::current_exception();
  }
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    if (forward) {
      events_ = run.events[rank_];
    } else {
      events_.insert(events_.end(), run.events[rank_].begin(),
                     run.events[rank_].end());
    }
  }
  if (error) {
    fail(state, error, forward, backward);
  }
  return error;
}

void DistributedCore::fail(StepState& state, const std::exception_ptr& error,
                           bool forward, bool backward) {
  state.failed = true;
  auto& t = *state.transport;
  bool broken = t.kind == FailKind::kComm ||
      (t.kind == FailKind::kPeer && t.peer_broken);
  const int64_t origin = t.kind == FailKind::kPeer ? t.origin : rank_;
  state.origin = origin;
  const std::string text =
      t.kind == FailKind::kPeer ? t.peer_text : describe_failure(error);
  const auto& cells = state.schedule[rank_];
  const bool last = rank_ + 1 == world_;
  auto in_pass = [&](const Cell& c) {
    return c.phase == Phase::kForward ? forward : backward && state.run.grad;
  };
  // 1. Tell the neighbours waiting for us.
  for (const auto& c : cells) {
    if (!in_pass(c)) {
      continue;
    }
    const bool bwd = c.phase == Phase::kBackward;
    const int64_t dst = bwd ? rank_ - 1 : rank_ + 1;
    if ((bwd ? rank_ > 0 : !last) && !t.was_sent(bwd, c.micro_batch) &&
        !t.send_poison(dst, c.micro_batch, bwd, origin, broken, text)) {
      broken = true;
    }
  }
  // 2. Take what we are still owed, so that no send stays unmatched.
  for (const auto& c : cells) {
    if (!in_pass(c)) {
      continue;
    }
    const bool bwd = c.phase == Phase::kBackward;
    const int64_t src = bwd ? rank_ + 1 : rank_ - 1;
    if ((bwd ? !last : rank_ > 0) && !t.was_received(bwd, c.micro_batch) &&
        !t.drain(src, c.micro_batch, bwd)) {
      broken = true;
    }
  }
  if (broken) {
    mark_broken(text);
    if (nccl_) {
      try {
        group_->abort();  // kernels stuck on a dead peer would never return
      } catch (...) {
      }
    }
  }
}

void DistributedCore::post_agreement(StepState& state) {
  state.agreement.clear();
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble).device(comm_device_);
  for (int64_t r = rank_ == 0 ? 1 : 0; r < (rank_ == 0 ? world_ : 1); ++r) {
    auto t = torch::empty({4}, f64);
    const std::string what = rank_ == 0
        ? "the status of rank " + std::to_string(r) + " at the end of step " +
            std::to_string(state.seq)
        : "the outcome of step " + std::to_string(state.seq);
    try {
      state.agreement.push_back(
          {t, p2p_recv(t, r, tag(rank_ == 0 ? kTagStatus : kTagOutcome), what), ""});
    } catch (const std::exception&) {  // raised by agree()
      state.agreement.push_back({t, nullptr, describe(std::current_exception())});
    }
  }
}

std::pair<double, int64_t> DistributedCore::agree(StepState& state,
                                                  const std::exception_ptr& error,
                                                  const torch::Tensor& loss,
                                                  const char* pass) {
  const std::string what = std::string("the end of the ") + pass + " of step " +
      std::to_string(state.seq);
  const int64_t self = error ? (state.origin >= 0 ? state.origin : rank_) : -1;
  auto status = torch::zeros({4}, torch::kDouble);
  auto* st = status.data_ptr<double>();
  st[0] = static_cast<double>(self + 1);
  if (loss.defined() && !error) {
    st[2] = loss.item<double>();
    st[3] = static_cast<double>(loss.scalar_type());
  }
  if (world_ == 1) {
    if (error) {
      std::rethrow_exception(error);
    }
    return {st[2], static_cast<int64_t>(st[3])};
  }
  // With NCCL a rank > 0 posts the receive of the outcome only after
  // sending its status: NCCL runs the two in posting order.
  if (state.agreement.empty() && !(nccl_ && rank_ != 0)) {
    post_agreement(state);
  }
  if (broken()) {
    // Tell, best effort and without waiting: the peers must not wait for us.
    st[1] = 1;
    try {
      const auto sent = status.to(comm_device_);
      for (int64_t r = rank_ == 0 ? 1 : 0; r < (rank_ == 0 ? world_ : 1); ++r) {
        p2p_send(sent, r, tag(rank_ == 0 ? kTagOutcome : kTagStatus), what);
      }
    } catch (...) {
    }
    if (error) {
      std::rethrow_exception(error);
    }
    TORCH_CHECK(false, "pipegear: rank ", rank_, ": ", what, ": ", broken_reason(),
                "; the process group is in an unknown state: destroy it and "
                "start again");
  }
  std::string comm_error;  // what went wrong with the agreement itself
  // The report (status or outcome) of agreement receive i, from `peer`;
  // null, with comm_error set, when it did not come.
  auto wait_one = [&](size_t i, int64_t peer) -> const double* {
    auto& report = state.agreement[i];
    std::string why = report.error;
    if (report.work) {
      const WaitResult r = wait_work(report.work, options_.timeout());
      if (r.ok()) {
        report.buffer = report.buffer.cpu();
        return report.buffer.data_ptr<double>();
      }
      why = r.timed_out() ? "nothing came within " + seconds(options_.timeout()) +
              " (did rank " + std::to_string(peer) + " die or hang?)"
                          : "receiving it failed: " + r.error;
    }
    mark_broken(what + ": rank " + std::to_string(peer) + " did not report");
    comm_error = "pipegear: rank " + std::to_string(rank_) + ": " + what +
        ": rank " + std::to_string(peer) + " did not report: " + why;
    return nullptr;
  };
  double outcome[4] = {st[0], 0, st[2], st[3]};
  if (rank_ == 0) {
    // The rank that failed by itself first, else any failed one.
    for (int64_t r = 1; r < world_; ++r) {
      const double* v = wait_one(static_cast<size_t>(r - 1), r);
      if (v == nullptr) {
        outcome[1] = 1;
        if (outcome[0] == 0) {
          outcome[0] = static_cast<double>(r + 1);
        }
        break;
      }
      if (v[0] != 0 && (outcome[0] == 0 || (v[0] == r + 1 && outcome[0] != 1))) {
        outcome[0] = v[0];
      }
      outcome[1] = std::max(outcome[1], v[1]);
      if (r + 1 == world_) {
        outcome[2] = v[2];
        outcome[3] = v[3];
      }
    }
    auto result = torch::tensor(std::vector<double>(outcome, outcome + 4),
                                torch::kDouble).to(comm_device_);
    for (int64_t r = 1; r < world_; ++r) {
      try {
        p2p_send(result, r, tag(kTagOutcome), "the outcome at " + what);
      } catch (const std::exception&) {  // marked broken by p2p_send
        if (comm_error.empty()) {
          comm_error = describe(std::current_exception());
        }
      }
    }
  } else {
    const double* v = nullptr;
    try {
      p2p_send(status.to(comm_device_), 0, tag(kTagStatus),
               "this rank's status at " + what);
      if (state.agreement.empty()) {
        post_agreement(state);
      }
      v = wait_one(0, 0);
    } catch (const std::exception&) {  // marked broken by p2p_send
      comm_error = describe(std::current_exception());
    }
    if (v == nullptr) {
      outcome[1] = 1;
    } else {
      std::copy(v, v + 4, outcome);
    }
  }
  if (outcome[1] != 0) {
    mark_broken(what + ": a rank lost its peers");
  }
  if (error) {
    std::rethrow_exception(error);
  }
  TORCH_CHECK(comm_error.empty(), comm_error);
  const auto origin = static_cast<int64_t>(outcome[0]) - 1;
  if (origin >= 0) {
    state.failed = true;
    TORCH_CHECK(false, "pipegear: rank ", rank_, ": rank ", origin, " failed in ",
                "the ", pass, " of step ", state.seq, " (see its error)");
  }
  check_not_broken();
  return {outcome[2], static_cast<int64_t>(outcome[3])};
}

void DistributedCore::finish_pass(StepState& state, const std::exception_ptr& error,
                                  const char* pass) {
  agree(state, error, torch::Tensor(), pass);
  const bool fill = std::string(pass) == "forward";
  raise_capacities(state, fill, !fill);
  flush_pending();
}

void DistributedCore::raise_capacities(const StepState& state, bool forward,
                                       bool backward) {
  auto round = [](int64_t n) { return (n + 4095) / 4096 * 4096; };
  for (int d = 0; d < 2; ++d) {
    if (d == 0 ? forward : backward) {
      send_capacity_[d] = std::max(send_capacity_[d],
                                   round(state.transport->largest_sent(d != 0)));
      recv_capacity_[d] = std::max(recv_capacity_[d],
                                   round(state.transport->largest_received(d != 0)));
    }
  }
}

// ---------------------------------------------------------------------------
torch::Tensor DistributedCore::step(const Batch& input, const Batch& target,
                                    const LossFn& loss_fn,
                                    const StepOptions& options,
                                    std::exception_ptr local_error) {
  std::lock_guard<std::mutex> call(call_mutex_);
  const bool first = rank_ == 0;
  const bool last = rank_ + 1 == world_;
  if (last && !loss_fn && !local_error) {
    try {
      TORCH_CHECK_VALUE(false, "step needs a loss function on the last rank, "
                        "got none");
    } catch (...) {
      local_error = std::current_exception();
    }
  }
  auto state = begin(Face::kStep, options.training(), input, local_error);
  if (state->pre_error) {
    fail_early(*state);
  }
  auto& run = state->run;
  // Everything after the header that may fail is a failure of the step: the
  // failure protocol tells the peers.
  std::exception_ptr error;
  torch::Tensor loss;
  try {
    if (last) {
      prepare_loss(run, target, loss_fn, options);
    }
  } catch (...) {
    error = std::current_exception();
    fail(*state, error, /*forward=*/true, /*backward=*/true);
  }
  if (!error) {
    error = run_cells(*state, /*forward=*/true, /*backward=*/run.grad);
  }
  if (!error) {
    try {
      if (first && run.grad) {
        // Gradients of the input, if it asked for them, flow on from here.
        backward_into_input(input, run);
      }
      if (last) {
        loss = weighted_loss(run);
      }
    } catch (...) {
      error = std::current_exception();  // nothing owed any more
    }
  }
  // Every rank learns who failed, and the loss of the last rank.
  const auto [value, dtype] = agree(*state, error, loss, "step");
  runner_.end_forward();  // every rank succeeded: commit (DeferredBatchNorm)
  raise_capacities(*state, true, true);
  flush_pending();
  if (last) {
    return loss;
  }
  return torch::tensor(value, torch::kDouble).to(static_cast<c10::ScalarType>(dtype));
}

// ---------------------------------------------------------------------------
namespace {

// This rank's share of a module-style step: its fill has run already, the
// drain is this rank's backward cells.
struct RankStep : PendingStep {
  std::shared_ptr<DistributedCore> core;
  std::shared_ptr<StepState> state;
  Batch output;  // the fill's result

  Batch fill() override { return std::move(output); }
  Batch drain(const Batch& grads) override {
    auto taken = std::move(state);  // freed with the drain
    return core->drain(*taken, grads);
  }
};

} // namespace

Batch DistributedCore::forward(const Batch& input, bool training,
                               std::exception_ptr local_error) {
  std::shared_ptr<StepState> state;
  Batch out;
  {
    std::lock_guard<std::mutex> call(call_mutex_);
    TORCH_CHECK_VALUE(options_.schedule() == ScheduleKind::kGPipe,
                      "module-style forward needs a fill/drain schedule "
                      "('gpipe'); the '1f1b' schedule runs only through step()");
    if (auto pending = undrained_.lock(); pending && !pending->drained) {
      std::exception_ptr error;
      try {
        TORCH_CHECK(false, "pipegear: rank ", rank_, ": the backward of the "
                    "previous forward (step ", pending->seq, ") has not run; "
                    "every rank must run it before the next forward (use "
                    "no_grad for forwards without backward)");
      } catch (...) {
        error = std::current_exception();
      }
      abandon_drain(*pending, error);
    }
    placeholder_ = torch::Tensor();
    state = begin(Face::kModule, training, input, local_error);
    if (state->pre_error) {
      fail_early(*state);
    }
    auto error = run_cells(*state, /*forward=*/true, /*backward=*/false);
    if (!error) {
      try {
        if (rank_ + 1 == world_) {
          out = gather(state->run.outputs);
        } else {
          out = {torch::zeros({}, torch::TensorOptions().device(stage_->device()))};
        }
      } catch (...) {
        error = std::current_exception();
      }
    }
    // Every rank raises, or none: a rank whose fill went well would
    // otherwise wait in a drain that never comes.
    finish_pass(*state, error, "forward");
    runner_.end_forward();  // every rank's fill succeeded
    if (!state->run.grad) {
      return out;
    }
    undrained_ = state;
  }
  auto step = c10::make_intrusive<RankStep>();
  step->core = shared_from_this();
  step->state = state;
  step->output = std::move(out);
  out = apply_pipeline_node(std::move(step), rank_ == 0 ? input : Batch{});
  if (rank_ + 1 != world_) {
    std::lock_guard<std::mutex> call(call_mutex_);
    placeholder_ = out.front();
  }
  return out;
}

Batch DistributedCore::drain(StepState& state, const Batch& grads) {
  std::lock_guard<std::mutex> call(call_mutex_);
  TORCH_CHECK(!state.abandoned, "pipegear: rank ", rank_, ": the backward of step ",
              state.seq, " comes after the next forward, which failed it on "
              "every rank (see that forward's error)");
  TORCH_CHECK(!state.drained, "pipegear: rank ", rank_, ": the backward of step ",
              state.seq, " ran twice");
  state.drained = true;
  placeholder_ = torch::Tensor();
  check_not_broken();
  auto& run = state.run;
  at::ThreadLocalStateGuard tls(run.tls);
  std::exception_ptr error;
  try {
    if (rank_ + 1 == world_) {
      split_output_grads(run, grads);
    } else {
      run.output_grads.assign(run.micro_batches, Batch{});
    }
  } catch (...) {
    error = std::current_exception();
    fail(state, error, /*forward=*/false, /*backward=*/true);
  }
  if (!error) {
    error = run_cells(state, /*forward=*/false, /*backward=*/true);
  }
  Batch out;
  if (!error && rank_ == 0) {
    out = gather_input_grads(run);
  }
  finish_pass(state, error, "backward");
  return out;
}

void DistributedCore::abandon_drain(StepState& state,
                                    const std::exception_ptr& error) {
  state.drained = true;
  state.abandoned = true;
  placeholder_ = torch::Tensor();
  check_not_broken();
  if (!nccl_) {
    post_agreement(state);
  }
  fail(state, error, /*forward=*/false, /*backward=*/true);
  agree(state, error, torch::Tensor(), "backward");
  std::rethrow_exception(error);  // agree rethrows it already
}

void DistributedCore::backward() {
  torch::Tensor p;
  {
    std::lock_guard<std::mutex> call(call_mutex_);
    TORCH_CHECK_VALUE(rank_ + 1 != world_, "pipegear: rank ", rank_, " is the "
                      "last rank: call backward on the loss of the output");
    TORCH_CHECK_VALUE(placeholder_.defined(), "pipegear: rank ", rank_,
                      ": no forward with a graph to run the backward of");
    p = std::move(placeholder_);
    placeholder_ = torch::Tensor();
  }
  p.backward();
}

} // namespace detail

// ---------------------------------------------------------------------------
DistributedPipeline::DistributedPipeline(
    c10::intrusive_ptr<c10d::ProcessGroup> group, std::shared_ptr<Stage> stage,
    DistributedOptions options)
    : core_(std::make_shared<detail::DistributedCore>(
          std::move(group), std::move(stage), nullptr, std::move(options))) {}

DistributedPipeline::DistributedPipeline(
    c10::intrusive_ptr<c10d::ProcessGroup> group, std::shared_ptr<Stage> stage,
    EngineOptions options, std::chrono::milliseconds timeout)
    : DistributedPipeline(std::move(group), std::move(stage),
                          DistributedOptions()
                              .chunks(options.chunks())
                              .checkpoint(options.checkpoint())
                              .schedule(options.schedule())
                              .timeout(timeout)) {}

DistributedPipeline::DistributedPipeline(
    c10::intrusive_ptr<c10d::ProcessGroup> group,
    const torch::nn::Sequential& model, DistributedOptions options) {
  detail::check_group(group, options);
  TORCH_CHECK_VALUE(model && !model->is_empty(),
                    "the module to pipeline must be a non-empty Sequential");
  TORCH_CHECK_VALUE(!options.balance().empty(), "the Sequential form needs "
                    "DistributedOptions().balance(...), one entry per rank");
  check_balance(options.balance(), static_cast<int64_t>(model->size()));
  auto part = detail::slice_of(options.balance(), group->getRank(),
                               [&](int64_t l) { return *(model->begin() + l); });
  auto stage = detail::make_stage(part, *group, options);
  core_ = std::make_shared<detail::DistributedCore>(
      std::move(group), std::move(stage), part, std::move(options));
}

DistributedPipeline::DistributedPipeline(
    c10::intrusive_ptr<c10d::ProcessGroup> group,
    const std::vector<LayerFactory>& layers, DistributedOptions options) {
  detail::check_group(group, options);
  TORCH_CHECK_VALUE(!layers.empty(), "the pipeline needs at least 1 layer factory");
  TORCH_CHECK_VALUE(!options.balance().empty(), "the factory form needs "
                    "DistributedOptions().balance(...), one entry per rank");
  check_balance(options.balance(), static_cast<int64_t>(layers.size()));
  auto part = detail::slice_of(options.balance(), group->getRank(), [&](int64_t l) {
    TORCH_CHECK_VALUE(static_cast<bool>(layers[l]), "layer factory ", l, " is empty");
    auto layer = layers[l]();
    TORCH_CHECK_VALUE(!layer.is_empty(), "layer factory ", l,
                      " returned an empty AnyModule");
    return layer;
  });
  auto stage = detail::make_stage(part, *group, options);
  core_ = std::make_shared<detail::DistributedCore>(
      std::move(group), std::move(stage), part, std::move(options));
}

DistributedPipeline::~DistributedPipeline() = default;

torch::Tensor DistributedPipeline::step(const Batch& input, const Batch& target,
                                        const LossFn& loss_fn,
                                        const StepOptions& options) {
  return core_->step(input, target, loss_fn, options);
}

Batch DistributedPipeline::forward(const Batch& input, bool training) {
  return core_->forward(input, training);
}

void DistributedPipeline::fail_step(std::exception_ptr error) {
  TORCH_CHECK_VALUE(error, "fail_step needs the error of this rank, got none");
  core_->step({}, {}, nullptr, {}, error);
  std::rethrow_exception(error);  // step() throws already
}

void DistributedPipeline::fail_forward(std::exception_ptr error) {
  TORCH_CHECK_VALUE(error, "fail_forward needs the error of this rank, got none");
  core_->forward({}, true, error);
  std::rethrow_exception(error);  // forward() throws already
}

void DistributedPipeline::backward() { core_->backward(); }

int64_t DistributedPipeline::rank() const { return core_->rank(); }
int64_t DistributedPipeline::world_size() const { return core_->world(); }
const DistributedOptions& DistributedPipeline::options() const {
  return core_->options();
}
const std::shared_ptr<Stage>& DistributedPipeline::stage() const {
  return core_->stage();
}
torch::nn::Sequential DistributedPipeline::module() const {
  return core_->module();
}
bool DistributedPipeline::broken() const { return core_->broken(); }
std::vector<TraceEvent> DistributedPipeline::last_events() const {
  return core_->last_events();
}

} // namespace pipegear
