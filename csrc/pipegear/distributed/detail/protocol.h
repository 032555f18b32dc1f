#pragma once
// Internal (never installed): what the ranks of a distributed pipeline tell
// each other around the cells, so that they start a step together, fail it
// together and end it together (docs/distributed.md, "Protocol" items 1 and
// 6, and "Failures"):
//   - at construction, that they agree on the configuration;
//   - at the start of a step, every rank's arrival and rank 0's step header
//     (or the failure of a rank before the step);
//   - after a failure in a pass, the failure protocol: poison the peers
//     waiting for this rank, drain what it is still owed;
//   - at the end of a pass, the agreement on its outcome: who failed first,
//     the loss.
// Built on the Link (link.h) and the step's C10dTransport (transport.h);
// the executor (pipeline.cpp) calls it.

#include <array>
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <pipegear/detail/step.h>
#include <pipegear/distributed/detail/link.h>
#include <pipegear/distributed/detail/transport.h>
#include <pipegear/distributed/options.h>
#include <pipegear/schedule.h>

namespace pipegear::detail {

/// The call every rank makes in a step: step() or forward().
enum class Face : int64_t { kStep = 1, kModule = 2 };

/// What rank 0 tells every rank at the start of a step.
struct StepHeader {
  int64_t seq = 0;
  Face face = Face::kStep;
  bool grad = false;            // rank 0's grad mode
  std::vector<int64_t> sizes;   // the micro-batches'
};

/// Everything one step needs, from the header to the end of its last pass.
struct StepState {
  Face face = Face::kStep;
  int64_t seq = 0;
  StepRun run;
  Schedule schedule;
  std::unique_ptr<C10dTransport> transport;
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

/// One rank's side of the protocol for one pipeline. Not thread-safe: the
/// executor makes one call at a time.
class Protocol {
 public:
  Protocol(Link& link, const DistributedOptions& options)
      : link_(link), options_(options) {}

  /// At construction, collective: checks that every rank runs the same
  /// configuration (ValueError naming the field and the ranks otherwise),
  /// takes the pipeline's tags and posts the receives of the first step.
  void connect();

  /// The number of the next step; every rank counts every step it starts,
  /// whatever happens in it.
  int64_t next_seq() { return seq_++; }

  // ---- the start of a step ------------------------------------------------
  // Every rank > 0 sends rank 0 its arrival (with `local_error`, its
  // failure before the step, if any); rank 0 waits for all of them
  // (idle_timeout), then sends every rank the step header: the step, the
  // call (step or forward), the grad mode, the micro-batch sizes, or that
  // the step failed before it began (rank 0's `local_error` or bad input,
  // or the first failed arrival, with its text), which every rank then
  // raises.

  /// Rank 0: waits for the arrivals, then sends every rank `header` (or
  /// the failure before the step). Raises that failure (`local_error`
  /// itself when it is this rank's).
  void lead(const StepHeader& header, const std::exception_ptr& local_error);
  /// Ranks > 0: sends the arrival, waits for rank 0's header of step `seq`
  /// (idle_timeout + timeout) and returns it. Raises the failure before the
  /// step (`local_error` itself when this rank had one).
  StepHeader follow(int64_t seq, const std::exception_ptr& local_error);
  /// The error of a rank > 0 whose call (`face`, `grad_mode`, step `seq`)
  /// disagrees with rank 0's header; null when it agrees.
  std::exception_ptr disagreement(const StepHeader& header, int64_t seq, Face face,
                                  bool grad_mode) const;

  // ---- failures and the end of a pass ---------------------------------------
  /// After a failure in a pass: poisons every message of the pass this rank
  /// still owes, receives (and drops) every one it is still owed, so that
  /// no message stays unmatched. Marks the links broken when the transport
  /// is in an unknown state (a timeout, a lost peer).
  void fail(StepState& state, const std::exception_ptr& error, bool forward,
            bool backward);
  /// Posts the receives of the agreement of the pass (Gloo: at its start,
  /// so the reports travel as soon as they are sent).
  void post_agreement(StepState& state);
  /// The end of a pass: every rank tells rank 0 whether its pass failed
  /// (the last rank adds the loss), rank 0 tells every rank the outcome, so
  /// that all of them raise, or none. Rethrows `error` if set; returns the
  /// loss (value, dtype) relayed by rank 0. A broken rank only tells, best
  /// effort, and raises.
  std::pair<double, int64_t> agree(StepState& state, const std::exception_ptr& error,
                                   const torch::Tensor& loss, const char* pass);

 private:
  // Rank 0: every other rank's arrival at a step.
  struct Arrivals {
    int64_t failed = -1;   // the first rank that failed before the step
    std::string text;      // its error
    int64_t missing = -1;  // the first rank that did not come (now broken)
    std::string why;       // the error: idle_timeout passed, or the backend's
  };
  // A report of the agreement, 4 doubles: the rank that failed + 1 (0:
  // none), whether a rank's links are broken, the loss and its dtype.
  using Report = std::array<double, 4>;

  int64_t rank() const { return link_.rank(); }
  int64_t world() const { return link_.world(); }
  int64_t header_words() const;
  // The protocol's own messages: a backend's error marks the links broken.
  void send_to(const torch::Tensor& t, int64_t dst, TagKind kind,
               const std::string& what);
  c10::intrusive_ptr<c10d::Work> post_recv(const torch::Tensor& t, int64_t src,
                                           TagKind kind, const std::string& what);

  void agree_on_configuration();
  void post_header_recv();
  void post_arrival_recvs();
  void post_arrival_recv(int64_t r, int64_t seq);
  // Waits until every rank > 0 has sent its arrival at step `seq`, all
  // within idle_timeout; stops at the first that does not come.
  Arrivals await_arrivals(int64_t seq);
  // Ranks > 0: the next header, once it came (idle_timeout + timeout).
  torch::Tensor await_header(const std::string& step_n);

  // The ranks this rank exchanges reports with: rank 0 with every other
  // one, the others with rank 0.
  std::vector<int64_t> reporters() const;
  // Agreement receive i, from `peer`; none, with `comm_error` set and the
  // links broken, when it did not come.
  std::optional<Report> wait_report(StepState& state, size_t i, int64_t peer,
                                    const std::string& what, std::string& comm_error);
  // A broken rank's part: tells, best effort and without waiting.
  void tell_broken(Report status, const std::string& what);
  // Rank 0: gathers the statuses, sends every rank the outcome.
  Report decide(StepState& state, const Report& status, const std::string& what,
                std::string& comm_error);
  // Ranks > 0: sends the status, receives the outcome.
  Report hear(StepState& state, const Report& status, const std::string& what,
              std::string& comm_error);

  Link& link_;
  const DistributedOptions& options_;
  int64_t seq_ = 0;                     // steps started, equal on every rank
  torch::Tensor next_header_;           // ranks > 0: the next step header's
  c10::intrusive_ptr<c10d::Work> next_header_work_;  // receive, posted early
  std::vector<torch::Tensor> arrival_;  // rank 0: every rank's next arrival's
  std::vector<c10::intrusive_ptr<c10d::Work>> arrival_work_;  // receive (by rank)
};

} // namespace pipegear::detail
