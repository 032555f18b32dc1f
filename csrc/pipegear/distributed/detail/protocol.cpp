// What the ranks tell each other around the cells: see protocol.h.
#include <pipegear/distributed/detail/protocol.h>

#include <algorithm>
#include <exception>

#include <pipegear/distributed/detail/wire.h>

namespace pipegear::detail {

namespace {

// The step header (rank 0 to every rank), int64 words: kHeadWords fixed
// ones, the M micro-batch sizes (room for `chunks`), then the text of a
// failure before the step, if any:
//   [step, call, grad mode, M (0: the step failed before it began), the
//    rank that failed before it + 1, bytes of its error's text, sizes...,
//    text]
constexpr int64_t kHeadWords = 6;
// An arrival (every rank > 0 to rank 0): whether the rank failed before the
// step, the length of its error's text, then the text.
constexpr int64_t kArrivalWords = 2;

const char* face_name(int64_t f) {
  return f == static_cast<int64_t>(Face::kStep) ? "step()" : "forward()";
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

} // namespace

int64_t Protocol::header_words() const {
  return kHeadWords + options_.chunks() + kNoteWords;
}

void Protocol::send_to(const torch::Tensor& t, int64_t dst, TagKind kind,
                       const std::string& what) {
  link_.send(t, dst, link_.tag(kind), what, /*step=*/-1, OnError::kBreak);
}

c10::intrusive_ptr<c10d::Work> Protocol::post_recv(const torch::Tensor& t, int64_t src,
                                                   TagKind kind,
                                                   const std::string& what) {
  return link_.recv(t, src, link_.tag(kind),
                    "posting the receive of " + what + " from rank " + std::to_string(src),
                    /*step=*/-1, OnError::kBreak);
}

// ---- construction ----------------------------------------------------------
void Protocol::connect() {
  agree_on_configuration();
  link_.take_tags();
  post_header_recv();
  post_arrival_recvs();
}

// Every rank must run the same K, chunks, checkpoint mode, schedule, stages
// per rank and balance: a mismatch would make ranks wait for messages that
// never come.
void Protocol::agree_on_configuration() {
  const int64_t fixed = 10;
  const int64_t width = fixed + world();
  // The skip layout and the whole balance (K * v entries), as checksums;
  // the first K entries of the balance also one by one, for the error.
  auto checksum_of = [](const std::vector<int64_t>& v) {
    int64_t sum = 0;
    for (const int64_t x : v) {
      sum = (sum * 1000003 + x + 1) % 1000000007;
    }
    return sum;
  };
  const auto& routes = options_.skip_routes();
  const auto& balance = options_.balance();
  std::vector<int64_t> mine{link_.first_tag(), world(), options_.chunks(),
                            static_cast<int64_t>(options_.checkpoint()),
                            static_cast<int64_t>(options_.schedule()),
                            static_cast<int64_t>(balance.size()),
                            static_cast<int64_t>(routes.size() / 2),
                            checksum_of(routes), options_.virtual_stages(),
                            checksum_of(balance)};
  for (int64_t s = 0; s < world(); ++s) {
    mine.push_back(s < static_cast<int64_t>(balance.size()) ? balance[s] : 0);
  }
  auto all = torch::zeros({world() * width}, torch::kInt64);
  std::copy(mine.begin(), mine.end(), all.data_ptr<int64_t>() + rank() * width);
  std::vector<at::Tensor> v{all.to(link_.device())};
  const std::string what = "checking that every rank has the same options";
  wait_collective(link_.allreduce(v, what), rank(), link_.timeout(), what);
  auto got = v[0].cpu();
  const int64_t* p = got.data_ptr<int64_t>();
  static const char* names[] = {"the first tag (after those of the pipelines "
                                "built on the group before this one)",
                                "world size", "chunks",
                                "checkpoint", "schedule", "balance length",
                                "the number of skip connections",
                                "the skip routes (a checksum)",
                                "virtual_stages", "the balance (a checksum)"};
  // Compared in the order that names the cause: virtual_stages before the
  // balance's length, the entries before their checksum.
  std::vector<int64_t> order{0, 1, 2, 3, 4, 8, 5, 6, 7};
  for (int64_t f = fixed; f < width; ++f) {
    order.push_back(f);
  }
  order.push_back(9);
  for (int64_t r = 0; r < world(); ++r) {
    for (const int64_t f : order) {
      if (p[r * width + f] != mine[f]) {
        const std::string field = f < fixed ? names[f]
                                            : "balance[" + std::to_string(f - fixed) + "]";
        TORCH_CHECK_VALUE(false, "pipegear: ranks disagree on the pipeline: ",
                          field, " is ", mine[f], " on rank ", rank(), " but ",
                          p[r * width + f], " on rank ", r,
                          " (every rank must pass the same options)");
      }
    }
  }
}

// ---- the start of a step ---------------------------------------------------
// Ranks > 0 post the receive of the next step header as soon as the last one
// arrived, so that it travels without a hand-shake. Not with NCCL, which
// matches receives to sends in posting order: the header receive would take
// the next micro-batch.
void Protocol::post_header_recv() {
  next_header_work_.reset();
  if (rank() == 0 || link_.nccl()) {
    return;
  }
  next_header_ = torch::empty({header_words()},
                              torch::TensorOptions().dtype(torch::kInt64).device(link_.device()));
  next_header_work_ = post_recv(next_header_, 0, kTagHeader,
                                "the header of step " + std::to_string(seq_));
}

// Rank 0 posts the receives of every rank's next arrival early, as the
// other ranks do the header's (Gloo only, for the same reason). A receive
// that cannot be posted is posted again, and its error raised with
// context, by await_arrivals.
void Protocol::post_arrival_recvs() {
  arrival_.assign(static_cast<size_t>(world()), torch::Tensor());
  arrival_work_.assign(static_cast<size_t>(world()), nullptr);
  if (rank() != 0 || link_.nccl()) {
    return;
  }
  for (int64_t r = 1; r < world(); ++r) {
    try {
      post_arrival_recv(r, seq_);
    } catch (const std::exception&) {
    }
  }
}

void Protocol::post_arrival_recv(int64_t r, int64_t seq) {
  arrival_[r] = torch::empty({kArrivalWords + kNoteWords},
                             torch::TensorOptions().dtype(torch::kInt64).device(link_.device()));
  arrival_work_[r] = nullptr;  // stays null if posting fails
  arrival_work_[r] = post_recv(arrival_[r], r, kTagArrival,
                               "the arrival of rank " + std::to_string(r) + " at step " +
                                   std::to_string(seq));
}

Protocol::Arrivals Protocol::await_arrivals(int64_t seq) {
  using std::chrono::milliseconds;
  Arrivals out;
  const auto idle = options_.idle_timeout();
  const auto deadline = std::chrono::steady_clock::now() + idle;
  for (int64_t r = 1; r < world(); ++r) {
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
      link_.mark_broken(why);
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

void Protocol::lead(const StepHeader& header, const std::exception_ptr& local_error) {
  const int64_t seq = header.seq;
  const std::vector<int64_t>& sizes = header.sizes;
  const std::string step_n = "step " + std::to_string(seq);
  // Start only once every rank has: before that, a rank may be busy for
  // long (a checkpoint, an evaluation) without any peer timing out.
  const Arrivals arrivals = world() > 1 ? await_arrivals(seq) : Arrivals{};
  // A rank that did not come: nobody to tell, since a timeout closes
  // every link of this process (Gloo), so the others fail at once.
  TORCH_CHECK(arrivals.missing < 0, arrivals.why);
  int64_t origin = -1;
  std::string text;
  if (local_error) {
    origin = 0;
    text = describe_failure(local_error);
  } else if (arrivals.failed >= 0) {
    origin = arrivals.failed;
    text = arrivals.text;
  }
  const int64_t note_at = kHeadWords + options_.chunks();
  auto words = torch::zeros({header_words()}, torch::kInt64);
  auto* h = words.data_ptr<int64_t>();
  h[0] = seq;
  h[1] = static_cast<int64_t>(header.face);
  h[2] = header.grad ? 1 : 0;
  h[3] = origin >= 0 ? 0 : static_cast<int64_t>(sizes.size());
  h[4] = origin + 1;
  h[5] = origin >= 0 ? put_note(h + note_at, text) : 0;
  std::copy(sizes.begin(), sizes.end(), h + kHeadWords);
  // Gloo accepts a message shorter than its receive: only the words used.
  const auto sent =
      (link_.nccl() ? words : words.narrow(0, 0, words_with_note(note_at, h[5])))
          .to(link_.device());
  for (int64_t r = 1; r < world(); ++r) {
    send_to(sent, r, kTagHeader, "the header of " + step_n);
  }
  post_arrival_recvs();
  if (origin >= 0) {
    // The ranks must hear of the failure even if this process ends as
    // soon as it raises (an exit closes the links with sends in flight).
    try {
      link_.flush();
    } catch (const std::exception&) {  // marked broken: raised next time
    }
  }
  if (local_error) {
    std::rethrow_exception(local_error);
  }
  TORCH_CHECK(arrivals.failed < 0, "pipegear: rank 0: rank ", arrivals.failed,
              " failed before ", step_n, " began: ", arrivals.text);
}

torch::Tensor Protocol::await_header(const std::string& step_n) {
  if (!next_header_work_) {
    next_header_ = torch::empty({header_words()},
                                torch::TensorOptions().dtype(torch::kInt64).device(link_.device()));
    next_header_work_ = post_recv(next_header_, 0, kTagHeader, "the header of " + step_n);
  }
  auto got = next_header_;
  // Rank 0 may be busy between steps for long: idle_timeout, not timeout.
  // Plus timeout: rank 0 waits idle_timeout for every rank to come; when
  // one does not, rank 0 is the one to time out and say which (the
  // others see their links to it close), not a rank that came early.
  const auto bound = options_.idle_timeout() + options_.timeout();
  const WaitResult r = wait_work(next_header_work_, bound);
  if (!r.ok()) {
    const std::string why = "waiting for rank 0 to start " + step_n +
        (r.timed_out() ? " timed out after " + seconds(bound) +
                 " (idle_timeout + timeout; did rank 0 die, hang or skip the call?)"
                       : " failed" + closed_by(0) + ": " + r.error);
    link_.mark_broken(why);
    TORCH_CHECK(false, "pipegear: rank ", rank(), ": ", why);
  }
  post_header_recv();
  return got.cpu();
}

StepHeader Protocol::follow(int64_t seq, const std::exception_ptr& local_error) {
  const std::string step_n = "step " + std::to_string(seq);
  // Tell rank 0 this rank has come (and whether it failed already).
  auto arrival = torch::zeros({kArrivalWords + kNoteWords}, torch::kInt64);
  auto* a = arrival.data_ptr<int64_t>();
  a[0] = local_error ? 1 : 0;
  a[1] = local_error ? put_note(a + kArrivalWords, describe_failure(local_error)) : 0;
  send_to((link_.nccl() ? arrival
                        : arrival.narrow(0, 0, words_with_note(kArrivalWords, a[1])))
              .to(link_.device()),
          0, kTagArrival, "this rank's arrival at " + step_n);
  const torch::Tensor got = await_header(step_n);
  const int64_t* g = got.data_ptr<int64_t>();
  if (g[3] == 0) {
    const int64_t origin = g[4] - 1;
    const std::string text = get_note(g + kHeadWords + options_.chunks(), g[5]);
    if (local_error) {
      std::rethrow_exception(local_error);
    }
    TORCH_CHECK(false, "pipegear: rank ", rank(), ": rank ", origin,
                " failed before ", step_n, " began: ", text);
  }
  TORCH_CHECK(g[3] >= 1 && g[3] <= options_.chunks(), "pipegear: rank ", rank(),
              ": bad micro-batch count ", g[3], " in the header of ", step_n);
  StepHeader header;
  header.seq = g[0];
  header.face = static_cast<Face>(g[1]);
  header.grad = g[2] != 0;
  header.sizes.assign(g + kHeadWords, g + kHeadWords + g[3]);
  return header;
}

std::exception_ptr Protocol::disagreement(const StepHeader& header, int64_t seq,
                                          Face face, bool grad_mode) const {
  try {
    TORCH_CHECK(header.seq == seq, "pipegear: rank ", rank(), ": rank 0 is at step ",
                header.seq, " while this rank is at step ", seq,
                "; a rank skipped a call");
    TORCH_CHECK(header.face == face, "pipegear: rank ", rank(), ": rank 0 called ",
                face_name(static_cast<int64_t>(header.face)),
                " while this rank called ", face_name(static_cast<int64_t>(face)),
                "; every rank must make the same call");
    TORCH_CHECK(header.grad == grad_mode, "pipegear: rank ", rank(),
                ": grad mode is ", grad_mode ? "on" : "off", " here but ",
                header.grad ? "on" : "off", " on rank 0; use torch.no_grad() / "
                "NoGradGuard on every rank or none");
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

// ---- failures --------------------------------------------------------------
void Protocol::fail(StepState& state, const std::exception_ptr& error, bool forward,
                    bool backward) {
  auto& t = *state.transport;
  bool broken = t.kind == FailKind::kComm ||
      (t.kind == FailKind::kPeer && t.peer_broken);
  const int64_t origin = t.kind == FailKind::kPeer ? t.origin : rank();
  state.origin = origin;
  const std::string text =
      t.kind == FailKind::kPeer ? t.peer_text : describe_failure(error);
  const auto& cells = state.schedule[rank()];
  // W cells exchange no message: they owe nobody and wait for nobody.
  auto in_pass = [&](const Cell& c) {
    return c.phase == Phase::kForward
        ? forward
        : carries_gradient(c.phase) && backward && state.run.grad;
  };
  // 1. Tell the neighbours waiting for us.
  for (const auto& c : cells) {
    const bool bwd = carries_gradient(c.phase);
    const auto r = t.route(c, /*sending=*/true);
    if (in_pass(c) && r && !t.was_sent(bwd, r->key) &&
        !t.send_poison(r->peer, r->key, bwd, origin, broken, text)) {
      broken = true;
    }
  }
  // 2. Take what we are still owed, so that no send stays unmatched.
  for (const auto& c : cells) {
    const bool bwd = carries_gradient(c.phase);
    const auto r = t.route(c, /*sending=*/false);
    if (in_pass(c) && r && !t.was_received(bwd, r->key) &&
        !t.drain(r->peer, r->key, bwd)) {
      broken = true;
    }
  }
  if (broken) {
    link_.mark_broken(text);
    if (link_.nccl()) {
      try {
        link_.group().abort();  // kernels stuck on a dead peer would never return
      } catch (...) {
      }
    }
  }
}

// ---- the end of a pass -----------------------------------------------------
std::vector<int64_t> Protocol::reporters() const {
  std::vector<int64_t> out;
  for (int64_t r = rank() == 0 ? 1 : 0; r < (rank() == 0 ? world() : 1); ++r) {
    out.push_back(r);
  }
  return out;
}

void Protocol::post_agreement(StepState& state) {
  state.agreement.clear();
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble).device(link_.device());
  for (const int64_t r : reporters()) {
    auto t = torch::empty({4}, f64);
    const std::string what = rank() == 0
        ? "the status of rank " + std::to_string(r) + " at the end of step " +
            std::to_string(state.seq)
        : "the outcome of step " + std::to_string(state.seq);
    try {
      state.agreement.push_back(
          {t, post_recv(t, r, rank() == 0 ? kTagStatus : kTagOutcome, what), ""});
    } catch (const std::exception&) {  // raised by agree()
      state.agreement.push_back({t, nullptr, describe(std::current_exception())});
    }
  }
}

std::optional<Protocol::Report> Protocol::wait_report(StepState& state, size_t i,
                                                      int64_t peer,
                                                      const std::string& what,
                                                      std::string& comm_error) {
  auto& report = state.agreement[i];
  std::string why = report.error;
  if (report.work) {
    const WaitResult r = wait_work(report.work, options_.timeout());
    if (r.ok()) {
      report.buffer = report.buffer.cpu();
      const double* v = report.buffer.data_ptr<double>();
      return Report{v[0], v[1], v[2], v[3]};
    }
    why = r.timed_out() ? "nothing came within " + seconds(options_.timeout()) +
            " (did rank " + std::to_string(peer) + " die or hang?)"
                        : "receiving it failed: " + r.error;
  }
  link_.mark_broken(what + ": rank " + std::to_string(peer) + " did not report");
  comm_error = "pipegear: rank " + std::to_string(rank()) + ": " + what +
      ": rank " + std::to_string(peer) + " did not report: " + why;
  return std::nullopt;
}

namespace {

torch::Tensor to_tensor(const std::array<double, 4>& report, c10::Device device) {
  return torch::tensor(std::vector<double>(report.begin(), report.end()), torch::kDouble)
      .to(device);
}

} // namespace

void Protocol::tell_broken(Report status, const std::string& what) {
  status[1] = 1;
  try {
    const auto sent = to_tensor(status, link_.device());
    for (const int64_t r : reporters()) {
      send_to(sent, r, rank() == 0 ? kTagOutcome : kTagStatus, what);
    }
  } catch (...) {
  }
}

Protocol::Report Protocol::decide(StepState& state, const Report& status,
                                  const std::string& what, std::string& comm_error) {
  Report outcome{status[0], 0, status[2], status[3]};
  // The rank that failed by itself first, else any failed one.
  for (int64_t r = 1; r < world(); ++r) {
    const auto v = wait_report(state, static_cast<size_t>(r - 1), r, what, comm_error);
    if (!v) {
      outcome[1] = 1;
      if (outcome[0] == 0) {
        outcome[0] = static_cast<double>(r + 1);
      }
      break;
    }
    const Report& got = *v;
    if (got[0] != 0 && (outcome[0] == 0 || (got[0] == r + 1 && outcome[0] != 1))) {
      outcome[0] = got[0];
    }
    outcome[1] = std::max(outcome[1], got[1]);
    if (r + 1 == world()) {
      outcome[2] = got[2];
      outcome[3] = got[3];
    }
  }
  const auto result = to_tensor(outcome, link_.device());
  for (int64_t r = 1; r < world(); ++r) {
    try {
      send_to(result, r, kTagOutcome, "the outcome at " + what);
    } catch (const std::exception&) {  // marked broken by send_to
      if (comm_error.empty()) {
        comm_error = describe(std::current_exception());
      }
    }
  }
  return outcome;
}

Protocol::Report Protocol::hear(StepState& state, const Report& status,
                                const std::string& what, std::string& comm_error) {
  std::optional<Report> v;
  try {
    send_to(to_tensor(status, link_.device()), 0, kTagStatus,
            "this rank's status at " + what);
    if (state.agreement.empty()) {
      post_agreement(state);
    }
    v = wait_report(state, 0, 0, what, comm_error);
  } catch (const std::exception&) {  // marked broken by send_to
    comm_error = describe(std::current_exception());
  }
  return v ? *v : Report{status[0], 1, status[2], status[3]};
}

std::pair<double, int64_t> Protocol::agree(StepState& state,
                                           const std::exception_ptr& error,
                                           const torch::Tensor& loss, const char* pass) {
  const std::string what = std::string("the end of the ") + pass + " of step " +
      std::to_string(state.seq);
  // A failed pass with skips between ranks leaves skip messages sent and
  // not received that no rank can name: the pipeline refuses later steps.
  struct BreakOnFailure {
    Link& link;
    bool skips;
    int uncaught = std::uncaught_exceptions();
    ~BreakOnFailure() {
      if (skips && std::uncaught_exceptions() > uncaught) {
        link.mark_broken("a step failed in a pipeline with skip connections "
                         "between ranks, whose messages cannot be drained");
      }
    }
  } break_on_failure{link_, !options_.skip_routes().empty()};
  const int64_t self = error ? (state.origin >= 0 ? state.origin : rank()) : -1;
  Report status{static_cast<double>(self + 1), 0, 0, 0};
  if (loss.defined() && !error) {
    status[2] = loss.item<double>();
    status[3] = static_cast<double>(loss.scalar_type());
  }
  if (world() == 1) {
    if (error) {
      std::rethrow_exception(error);
    }
    return {status[2], static_cast<int64_t>(status[3])};
  }
  // With NCCL a rank > 0 posts the receive of the outcome only after
  // sending its status: NCCL runs the two in posting order.
  if (state.agreement.empty() && !(link_.nccl() && rank() != 0)) {
    post_agreement(state);
  }
  if (link_.broken()) {
    // The peers must not wait for us.
    tell_broken(status, what);
    if (error) {
      std::rethrow_exception(error);
    }
    TORCH_CHECK(false, "pipegear: rank ", rank(), ": ", what, ": ",
                link_.broken_reason(),
                "; the process group is in an unknown state: destroy it and "
                "start again");
  }
  std::string comm_error;  // what went wrong with the agreement itself
  const Report outcome = rank() == 0 ? decide(state, status, what, comm_error)
                                     : hear(state, status, what, comm_error);
  if (outcome[1] != 0) {
    link_.mark_broken(what + ": a rank lost its peers");
  }
  if (error) {
    std::rethrow_exception(error);
  }
  TORCH_CHECK(comm_error.empty(), comm_error);
  const auto origin = static_cast<int64_t>(outcome[0]) - 1;
  TORCH_CHECK(origin < 0, "pipegear: rank ", rank(), ": rank ", origin, " failed in ",
              "the ", pass, " of step ", state.seq, " (see its error)");
  link_.check_not_broken();
  return {outcome[2], static_cast<int64_t>(outcome[3])};
}

} // namespace pipegear::detail
