#pragma once
// Internal (never installed): one rank's point-to-point messaging for one
// distributed pipeline over a c10d ProcessGroup. Posting sends and receives
// with pipegear's context on the backend's errors, the sends in flight,
// waits bounded by a timeout, the capacity of the links to the
// neighbours, the pipeline's range of tags, and whether the links are in an
// unknown state (broken). What the messages say is not known here: the
// transport (transport.h) and the protocol (protocol.h) build on this.

#include <chrono>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace pipegear::detail {

// ---- texts of failures ---------------------------------------------------
/// The text of an exception: what_without_backtrace for a c10::Error.
std::string describe(const std::exception_ptr& e);
/// Why a link to `peer` fails at once: Gloo closes every link of a process
/// when one of its waits times out (and all of them when it dies).
std::string closed_by(int64_t peer);
/// "1.5 s".
std::string seconds(std::chrono::milliseconds t);

// ---- waits -----------------------------------------------------------------
/// How a wait on a c10d Work ended.
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
                     std::chrono::milliseconds timeout);

/// Waits for `work` (a collective, a send) up to `timeout`; raises, naming
/// `rank` and `what`, if it failed or timed out.
void wait_collective(const c10::intrusive_ptr<c10d::Work>& work, int64_t rank,
                     std::chrono::milliseconds timeout, const std::string& what);

// ---- tags ------------------------------------------------------------------
// Tags in use: [0, kTags).
constexpr int64_t kTags = int64_t{1} << 30;

// Every pipeline built on a group gets its own range of tags (see
// Link::Link): micro-batch j sends 2j (activations) and 2j + 1
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

// ---- the link --------------------------------------------------------------
/// What a backend's error does besides raising with pipegear's context.
enum class OnError {
  kBreak,  // marks the links broken at once (a message of the protocol)
  kThrow,  // nothing more: the transport's failure protocol decides
};

/// A send posted and not yet waited for.
struct PendingSend {
  c10::intrusive_ptr<c10d::Work> work;
  int64_t peer;
  std::string what;
};

/// This rank's messaging for one pipeline. Every c10d call of the pipeline
/// goes through it: an error of the backend (Gloo: "Connection closed by
/// peer" on a link a peer gave up on) is raised as
/// "pipegear: rank R: <doing> failed (did rank P die, ...): <error>".
/// Not thread-safe but for broken(), broken_reason() and mark_broken().
class Link {
 public:
  /// `device`: where the messages' buffers live (the CPU with Gloo, the
  /// stage's device with NCCL). Takes the next free range of tags of the
  /// group (take_tags() once the ranks agree on it); ValueError when
  /// `chunks` need more tags than there are.
  Link(c10::intrusive_ptr<c10d::ProcessGroup> group, c10::Device device,
       int64_t chunks, std::chrono::milliseconds timeout, int64_t skips = 0);

  c10d::ProcessGroup& group() { return *group_; }
  int64_t rank() const { return rank_; }
  int64_t world() const { return world_; }
  bool nccl() const { return nccl_; }
  c10::Device device() const { return device_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  // Tags of this pipeline's range.
  int tag_of(int64_t j, bool backward) const {
    return static_cast<int>(tag_base_ + 2 * j + (backward ? 1 : 0));
  }
  int tag(TagKind kind) const {
    return static_cast<int>(tag_base_ + 2 * chunks_ + kind);
  }
  // Skip `id` of micro-batch j (its tensor, or its gradient): after the
  // kinds, 2 per (skip, micro-batch).
  int skip_tag(int64_t id, int64_t j, bool backward) const {
    return static_cast<int>(tag_base_ + 2 * chunks_ + kTagKinds +
                            2 * (id * chunks_ + j) + (backward ? 1 : 0));
  }
  int64_t first_tag() const { return tag_base_; }
  /// Records the range as taken, once every rank agreed on first_tag(): the
  /// next pipeline built on the group starts after it.
  void take_tags();

  /// The capacity of the link to the neighbour of a direction (see
  /// C10dTransport): the size of a receive, the largest message sent whole.
  int64_t capacity(bool backward, bool send) const;
  /// After a pass that every rank completed: both ends raise the link's
  /// capacity to the largest message it carried, so they agree unasked.
  void grow(bool backward, int64_t largest_sent, int64_t largest_received);

  // `step`: the step a message belongs to (-1: none), which the errors
  // name; a number, so that a receive or a wait composes no text unless it
  // fails.

  /// Posts a send of `t` (waited for by flush()). Errors: "sending <what>
  /// to rank <dst>[ in step <step>]".
  void send(const torch::Tensor& t, int64_t dst, int tag, const std::string& what,
            int64_t step, OnError on_error);
  /// Posts a receive into `t`. Errors: "<doing>[ in step <step>]".
  c10::intrusive_ptr<c10d::Work> recv(const torch::Tensor& t, int64_t src, int tag,
                                      const std::string& doing, int64_t step,
                                      OnError on_error);
  /// A sum over the ranks, bounded by the timeout inside the backend too (a
  /// collective stuck on a dead peer would block the group's worker).
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& v,
                                           const std::string& doing);
  /// Waits up to the timeout for a message `doing` from `peer`; raises
  /// (without marking the links broken) if it timed out or failed.
  void wait(const c10::intrusive_ptr<c10d::Work>& work, int64_t peer,
            const std::string& doing, int64_t step);

  /// Surfaces failed sends among those already completed; keeps the others.
  void prune();
  /// Waits for every send in flight (each bounded by the timeout).
  void flush();

  /// The links are in an unknown state (a timeout, a lost peer): every
  /// later call raises. The first reason is kept.
  void mark_broken(const std::string& why);
  bool broken() const;
  std::string broken_reason() const;
  void check_not_broken() const;

 private:
  // Called from a catch block: raises the backend's error with `doing`.
  [[noreturn]] void fail(const std::string& doing, int64_t peer, OnError on_error);

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  int64_t rank_;
  int64_t world_;
  bool nccl_;
  c10::Device device_;
  int64_t chunks_;
  std::chrono::milliseconds timeout_;
  int64_t tags_;  // the length of the range
  int64_t tag_base_;
  std::vector<PendingSend> pending_;
  // Link capacities (Gloo), raised after every pass all ranks completed.
  int64_t send_capacity_[2];
  int64_t recv_capacity_[2];

  mutable std::mutex mutex_;  // broken_ and broken_reason_
  bool broken_ = false;
  std::string broken_reason_;
};

} // namespace pipegear::detail
