// The distributed executor: this rank's row of the schedule on the calling
// thread, with the in-process engine's CellRunner and a transport over c10d
// point-to-point messages. The layers below it, each in a file of its own
// under distributed/detail/: the bytes of a message (wire), the c10d
// point-to-point layer (link), one step's messages (transport), what the
// ranks tell each other around the cells (protocol). Protocol and failure
// handling: docs/distributed.md.
#include <pipegear/distributed/pipeline.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <utility>

#include <torch/autograd.h>
#include <torch/cuda.h>

#include <pipegear/detail/cells.h>
#include <pipegear/detail/pipeline_node.h>
#include <pipegear/distributed/detail/link.h>
#include <pipegear/distributed/detail/protocol.h>
#include <pipegear/distributed/detail/replicas.h>
#include <pipegear/distributed/detail/transport.h>
#include <pipegear/gpipe.h>
#include <pipegear/microbatch.h>
#include <pipegear/nn/deferred_batch_norm.h>
#include <pipegear/detail/random.h>
#include <pipegear/schedule.h>
#include <pipegear/distributed/detail/tied.h>

namespace pipegear {
namespace detail {

class DistributedCore : public std::enable_shared_from_this<DistributedCore> {
 public:
  // `dp_group` (may be null): the replicas of this rank's stage, whose
  // parameters and buffers are `module`'s, else `tensors` (a Python
  // stage's: parameters, then buffers).
  // `stages`: this rank's, one per virtual stage.
  DistributedCore(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                  std::vector<std::shared_ptr<Stage>> stages,
                  torch::nn::Sequential module,
                  DistributedOptions options,
                  c10::intrusive_ptr<c10d::ProcessGroup> dp_group = {},
                  int64_t bucket_bytes = int64_t{25} << 20,
                  std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>>
                      tensors = {});

  // `local_error`: this rank's mistake found before the step, if any: every
  // rank's call throws at once (see Protocol::lead).
  torch::Tensor step(const Batch& input, const Batch& target,
                     const LossFn& loss_fn, const StepOptions& options,
                     std::exception_ptr local_error = nullptr);
  Batch forward(const Batch& input, bool training,
                std::exception_ptr local_error = nullptr);
  void backward();
  // Module style, the drain pass of `state` (from the autograd node).
  Batch drain(StepState& state, const Batch& grads);
  // Parameters this rank shares with others (the Sequential form): agreed
  // on and given the first holder's value now (a collective), their
  // gradients summed after every drain.
  void tie(std::vector<TiedParameter> ties);

  int64_t rank() const { return link_.rank(); }
  int64_t world() const { return link_.world(); }
  int64_t replica() const { return replicas_ ? replicas_->replica() : 0; }
  int64_t replicas() const { return replicas_ ? replicas_->replicas() : 1; }
  const DistributedOptions& options() const { return options_; }
  const std::shared_ptr<Stage>& stage() const { return stages_.front(); }
  const std::vector<std::shared_ptr<Stage>>& stages() const { return stages_; }
  torch::nn::Sequential module() const { return module_; }
  bool broken() const { return link_.broken() || (replicas_ && replicas_->broken()); }
  void set_after_backward(std::function<void()> hook) {
    std::lock_guard<std::mutex> call(call_mutex_);
    after_backward_ = std::move(hook);
  }
  void set_before_last_backward(std::function<void()> hook) {
    std::lock_guard<std::mutex> call(call_mutex_);
    before_last_backward_ = std::move(hook);
  }
  std::vector<TraceEvent> last_events() const {
    std::lock_guard<std::mutex> lock(events_mutex_);
    return events_;
  }

 private:
  bool is_last() const { return rank() + 1 == world(); }
  int64_t virtual_stages() const { return static_cast<int64_t>(stages_.size()); }
  // One step of this pipeline (step() without the replicas).
  torch::Tensor run_step(const Batch& input, const Batch& target,
                         const LossFn& loss_fn, const StepOptions& options,
                         std::exception_ptr local_error);
  // The start of a step (Protocol::lead / follow): the header every rank
  // agrees on, and the step's state. A rank whose own call disagrees with
  // the header keeps the error in the state's pre_error and fails the step
  // (fail_early).
  std::shared_ptr<StepState> begin(Face face, bool training, const Batch& input,
                                   std::exception_ptr local_error);
  // A rank whose call disagrees with the header fails the first pass of
  // the step the way rank 0 runs it, then raises.
  [[noreturn]] void fail_early(StepState& state);
  // Runs this rank's cells of the pass; on failure runs the failure
  // protocol and returns the error.
  std::exception_ptr run_cells(StepState& state, bool forward, bool backward);
  // Module style: agree, then raise the capacities and wait for the sends.
  void finish_pass(StepState& state, const std::exception_ptr& error,
                   const char* pass);
  // Module style: a forward() while the drain of the previous forward has
  // not run: see abandon_drain.
  void check_drained();
  // The peers wait for this rank in the drain of `state`, not in a next
  // step: fails the drain as a failing backward would, so that they raise
  // at once, then raises `error`. A later backward through the old output
  // raises.
  [[noreturn]] void abandon_drain(StepState& state, const std::exception_ptr& error);
  void end_forward() {
    for (auto& runner : runners_) {
      runner->end_forward();
    }
  }

  std::vector<std::shared_ptr<Stage>> stages_;
  torch::nn::Sequential module_;
  DistributedOptions options_;
  // One per stage of this rank (by Cell::chunk); a runner's index is its
  // stage's in the pipeline.
  std::vector<std::unique_ptr<CellRunner>> runners_;
  Link link_;
  Protocol protocol_;

  std::unique_ptr<TiedAcrossRanks> ties_;  // null: none

  std::function<void()> after_backward_;  // set_after_backward
  std::function<void()> before_last_backward_;  // set_before_last_backward
  std::unique_ptr<Replicas> replicas_;    // null without a dp group
  int64_t last_origin_ = -1;  // the pipeline rank that failed the last step
  std::mutex call_mutex_;  // one call (step, forward, drain) at a time
  std::weak_ptr<StepState> undrained_;  // module style: fill done, drain not
  torch::Tensor placeholder_;           // module style: for backward()

  mutable std::mutex events_mutex_;
  std::vector<TraceEvent> events_;
};

namespace {

// A step's use of the tied parameters: their gradients set aside at the
// start, summed over the ranks (commit) or only given back (a failed pass).
class TiedStep {
 public:
  explicit TiedStep(TiedAcrossRanks* ties) : ties_(ties) {
    if (ties_) {
      ties_->begin();
    }
  }
  ~TiedStep() {
    if (ties_) {
      ties_->end(false);
    }
  }
  TiedStep(const TiedStep&) = delete;
  TiedStep& operator=(const TiedStep&) = delete;
  void commit(bool sum) {
    if (auto* ties = std::exchange(ties_, nullptr)) {
      ties->end(sum);
    }
  }

 private:
  TiedAcrossRanks* ties_;
};

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
  const int64_t v = options.virtual_stages();
  TORCH_CHECK_VALUE(v >= 1, "virtual_stages must be at least 1, got ", v);
  const auto& balance = options.balance();
  if (!balance.empty() && v == 1) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(balance.size()) == world,
                      "balance has ", balance.size(), " stages but the process "
                      "group has ", world, " ranks: one rank per stage");
  } else if (!balance.empty()) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(balance.size()) == world * v,
                      "balance has ", balance.size(), " stages but ", world,
                      " ranks with virtual_stages = ", v, " run ", world * v);
  }
}

// The index in the model of stage `stage`'s first layer (-1: no balance).
int64_t first_layer_of(const std::vector<int64_t>& balance, int64_t stage) {
  if (balance.empty()) {
    return -1;
  }
  int64_t first = 0;
  for (int64_t s = 0; s < stage && s < static_cast<int64_t>(balance.size()); ++s) {
    first += balance[s];
  }
  return first;
}

// Stage `stage`'s slice of `layers`, named by index.
torch::nn::Sequential slice_of(const std::vector<int64_t>& balance, int64_t stage,
                               const std::function<torch::nn::AnyModule(int64_t)>& layer) {
  const int64_t offset = first_layer_of(balance, stage);
  torch::nn::Sequential part;
  for (int64_t l = offset; l < offset + balance[stage]; ++l) {
    part->push_back(std::to_string(l), layer(l));
  }
  return part;
}

std::shared_ptr<Stage> make_stage(torch::nn::Sequential& part,
                                  const c10d::ProcessGroup& group,
                                  const DistributedOptions& options, int64_t stage,
                                  StageSkipKeys skips = {}) {
  if (options.deferred_batch_norm()) {
    part = convert_deferred_batch_norm(part, options.chunks());
  }
  const auto device = options.device() ? *options.device() : default_device(group);
  part->to(device);
  return std::make_shared<SequentialStage>(
      part, device, first_layer_of(options.balance(), stage), std::move(skips));
}

// The arguments of a core, checked in the order users meet their errors
// (the tags' own limit: Link).
DistributedOptions checked(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                           const std::vector<std::shared_ptr<Stage>>& stages,
                           DistributedOptions options) {
  TORCH_CHECK_VALUE(group, "DistributedPipeline needs a process group, got null");
  const int64_t v = options.virtual_stages();
  TORCH_CHECK_VALUE(v >= 1, "virtual_stages must be at least 1, got ", v);
  TORCH_CHECK_VALUE(static_cast<int64_t>(stages.size()) == v, "rank ",
                    group->getRank(), " got ", stages.size(), " stages but "
                    "virtual_stages is ", v, ": one stage per virtual stage");
  for (size_t c = 0; c < stages.size(); ++c) {
    TORCH_CHECK_VALUE(stages[c], "DistributedPipeline needs a stage, got null",
                      v > 1 ? " (virtual stage " + std::to_string(c) + ")" : "");
    TORCH_CHECK_VALUE(stages[c]->device() == stages.front()->device(), "rank ",
                      group->getRank(), "'s stages share one device, but its "
                      "virtual stage 0 is on ", stages.front()->device(),
                      " and virtual stage ", c, " on ", stages[c]->device());
  }
  TORCH_CHECK_VALUE(v == 1 || takes_virtual_stages(options.schedule()),
                    "virtual_stages = ", v,
                    " needs the 'interleaved' or 'interleaved-zb' schedule");
  if (v > 1) {
    // Stages of one rank would send each other messages: with one rank
    // the in-process GPipe runs the same schedule.
    TORCH_CHECK_VALUE(group->getSize() >= 2, "virtual_stages = ", v, " needs "
                      "at least 2 ranks (with one, use the in-process GPipe)");
    // NCCL matches messages by posting order; with several stages per rank
    // a link carries activations and gradients of several stage pairs,
    // whose orders on both ends are not the same.
    TORCH_CHECK_VALUE(group->getBackendName() != "nccl", "virtual_stages = ",
                      v, " runs on Gloo process groups only (NCCL matches "
                      "messages by posting order)");
    TORCH_CHECK_VALUE(options.skip_routes().empty(), "skip connections "
                      "between ranks are not supported with virtual_stages = ",
                      v);
  }
  TORCH_CHECK_VALUE(options.chunks() >= 1, "chunks must be at least 1, got ",
                    options.chunks());
  TORCH_CHECK_VALUE(options.timeout().count() > 0,
                    "timeout must be positive, got ", options.timeout().count(),
                    " ms");
  TORCH_CHECK_VALUE(options.idle_timeout().count() > 0,
                    "idle_timeout must be positive, got ",
                    options.idle_timeout().count(), " ms");
  check_group(group, options);
  // The skip routes: pairs of ranks, a skip going forward, this rank's
  // stage popping and stashing what the routes say.
  const auto& routes = options.skip_routes();
  const int64_t rank = group->getRank();
  TORCH_CHECK_VALUE(routes.size() % 2 == 0, "skip_routes holds (stash rank, "
                    "pop rank) pairs, got ", routes.size(), " numbers");
  const int64_t skips = static_cast<int64_t>(routes.size()) / 2;
  for (int64_t id = 0; id < skips; ++id) {
    const int64_t from = routes[2 * id], to = routes[2 * id + 1];
    TORCH_CHECK_VALUE(0 <= from && from < to && to < group->getSize(), "skip ",
                      id, " goes from rank ", from, " to rank ", to,
                      "; a skip goes to a later rank of the group");
  }
  for (const auto& stage : stages) {
    for (const auto& [ids, popper] :
         {std::pair(&stage->skips().pop, true),
          std::pair(&stage->skips().stash, false)}) {
      for (int64_t id : *ids) {
        TORCH_CHECK_VALUE(0 <= id && id < skips &&
                              routes[2 * id + (popper ? 1 : 0)] == rank,
                          "rank ", rank, "'s stage ", popper ? "pops" : "stashes",
                          " skip ", id, ", which skip_routes does not route ",
                          popper ? "to" : "from", " it");
      }
    }
  }
  if (group->getBackendName() == "nccl") {
    TORCH_CHECK_VALUE(!stages.front()->device().is_cpu(), "rank ", group->getRank(),
                      ": an NCCL process group needs the stage on a CUDA device, got ",
                      stages.front()->device());
  }
  return options;
}

// Where the messages' buffers live: the stage's device with NCCL, else the
// CPU (Gloo moves the payload through it).
c10::Device comm_device(const c10d::ProcessGroup& group, const Stage& stage) {
  return group.getBackendName() == "nccl" ? stage.device() : c10::Device(c10::kCPU);
}

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

// ---------------------------------------------------------------------------
DistributedCore::DistributedCore(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                                 std::vector<std::shared_ptr<Stage>> stages,
                                 torch::nn::Sequential module,
                                 DistributedOptions options,
                                 c10::intrusive_ptr<c10d::ProcessGroup> dp_group,
                                 int64_t bucket_bytes,
                                 std::pair<std::vector<torch::Tensor>,
                                           std::vector<torch::Tensor>> tensors)
    : stages_(std::move(stages)),
      module_(std::move(module)),
      options_(checked(group, stages_, std::move(options))),
      // One range of tags per stage boundary a link carries (transport.h).
      link_(group, comm_device(*group, *stages_.front()),
            options_.chunks() * options_.virtual_stages(), options_.timeout(),
            static_cast<int64_t>(options_.skip_routes().size()) / 2),
      protocol_(link_, options_) {
  // Untested together (the Python face's replicas run interleaved).
  TORCH_CHECK_VALUE(!dp_group || options_.virtual_stages() == 1,
                    "the C++ DistributedPipeline does not run replicas (a dp "
                    "group) with virtual_stages = ", options_.virtual_stages(),
                    "; use the Python DistributedGPipe");
  register_random_kernels();
  for (size_t c = 0; c < stages_.size(); ++c) {
    runners_.push_back(std::make_unique<CellRunner>(
        stages_[c], static_cast<int64_t>(c) * world() + rank()));
  }
  // How errors name the skips (cells.h, skip_labels): by rank.
  const auto& routes = options_.skip_routes();
  std::vector<int64_t> from, to;
  for (size_t i = 0; i + 1 < routes.size(); i += 2) {
    from.push_back(routes[i]);
    to.push_back(routes[i + 1]);
  }
  for (auto& runner : runners_) {
    runner->set_skip_labels(skip_labels(runner->stage().skips().names, from, to,
                                        "rank"));
  }
  protocol_.connect();
  if (dp_group) {
    if (module_) {
      tensors = {module_->parameters(), module_->buffers()};
    }
    replicas_ = std::make_unique<Replicas>(std::move(dp_group), rank(), world(),
                                           std::move(tensors.first),
                                           std::move(tensors.second), options_,
                                           bucket_bytes);
  }
}

void DistributedCore::tie(std::vector<TiedParameter> ties) {
  std::lock_guard<std::mutex> call(call_mutex_);
  auto t = std::make_unique<TiedAcrossRanks>(link_, std::move(ties));
  t->start();  // every rank, even one that holds none (a collective)
  if (!t->empty()) {
    ties_ = std::move(t);
  }
}

std::shared_ptr<StepState> DistributedCore::begin(Face face, bool training,
                                                  const Batch& input,
                                                  std::exception_ptr local_error) {
  link_.check_not_broken();
  // Sends of an earlier step (a failed one) should all be through by now.
  link_.flush();
  auto state = std::make_shared<StepState>();
  const bool grad_mode = c10::GradMode::is_enabled();
  const int64_t seq = protocol_.next_seq();  // every rank counts the step
  StepHeader header{seq, face, grad_mode, {}};  // ranks > 0: rank 0's
  if (rank() == 0) {
    if (!local_error) {
      try {
        TORCH_CHECK_VALUE(!input.empty(), "rank 0 must pass the input, got none");
        header.sizes = scatter_input(state->run, input, options_.chunks());
      } catch (...) {
        local_error = std::current_exception();
      }
    }
    protocol_.lead(header, local_error);
  } else {
    header = protocol_.follow(seq, local_error);
    state->pre_error =
        local_error ? local_error : protocol_.disagreement(header, seq, face, grad_mode);
  }
  state->face = header.face;
  state->seq = seq;
  // A graph is kept whenever grad mode is on (rank 0's, agreed above):
  // whether some stage needs one is not known on every rank without
  // another exchange.
  const int64_t stages = world() * virtual_stages();
  prepare_run(state->run, stages, header.sizes, header.grad,
              call_checkpoint(options_.checkpoint(), training),
              at::ThreadLocalState());
  state->schedule = make_schedule(options_.schedule(), world(),
                                  static_cast<int64_t>(header.sizes.size()),
                                  virtual_stages());
  state->transport = std::make_unique<C10dTransport>(
      link_, seq, stages, options_.chunks(), &options_.skip_routes());
  return state;
}

void DistributedCore::fail_early(StepState& state) {
  const bool step = state.face == Face::kStep;
  if (!link_.nccl()) {
    protocol_.post_agreement(state);
  }
  protocol_.fail(state, state.pre_error, /*forward=*/true, /*backward=*/step);
  last_origin_ = state.origin;
  protocol_.agree(state, state.pre_error, torch::Tensor(), step ? "step" : "forward");
  std::rethrow_exception(state.pre_error);  // agree rethrows it already
}

std::exception_ptr DistributedCore::run_cells(StepState& state, bool forward,
                                              bool backward) {
  const auto& cells = state.schedule[rank()];
  auto& run = state.run;
  for (const auto& runner : runners_) {
    run.events[runner->index()].clear();
  }
  std::exception_ptr error;
  try {
    if (!link_.nccl()) {
      protocol_.post_agreement(state);  // NCCL: in order, see Protocol::agree
    }
    state.transport->begin_pass(cells, forward, backward && run.grad);
    // The last cell that accumulates parameter gradients (a whole
    // backward, or W when split): where this rank's gradients become final.
    size_t last_backward = cells.size();
    if (backward && run.grad && before_last_backward_) {
      for (size_t i = 0; i < cells.size(); ++i) {
        if (cells[i].phase == Phase::kBackward ||
            cells[i].phase == Phase::kBackwardWeight) {
          last_backward = i;
        }
      }
    }
    for (size_t i = 0; i < cells.size(); ++i) {
      if (i == last_backward) {
        before_last_backward_();
      }
      runners_[cells[i].chunk]->run(run, *state.transport, cells, i, forward,
                                    backward);
    }
  } catch (...) {
    error = std::current_exception();
  }
  {
    std::lock_guard<std::mutex> lock(events_mutex_);
    if (forward) {
      events_.clear();
    }
    for (const auto& runner : runners_) {
      const auto& mine = run.events[runner->index()];
      events_.insert(events_.end(), mine.begin(), mine.end());
    }
    for (auto& e : events_) {
      e.chunk = e.stage / world();  // the stage is chunk * K + rank
    }
    std::stable_sort(events_.begin(), events_.end(), [](const auto& a, const auto& b) {
      return a.start_ns < b.start_ns;
    });
  }
  if (error) {
    protocol_.fail(state, error, forward, backward);
  }
  return error;
}

void DistributedCore::finish_pass(StepState& state, const std::exception_ptr& error,
                                  const char* pass) {
  protocol_.agree(state, error, torch::Tensor(), pass);
  const bool fill = std::string(pass) == "forward";
  state.transport->grow_capacities(fill, !fill);
  link_.flush();
}

// ---------------------------------------------------------------------------
torch::Tensor DistributedCore::step(const Batch& input, const Batch& target,
                                    const LossFn& loss_fn,
                                    const StepOptions& options,
                                    std::exception_ptr local_error) {
  if (!replicas_) {
    return run_step(input, target, loss_fn, options, local_error);
  }
  const bool grad = c10::GradMode::is_enabled();
  replicas_->begin();
  // The last stages weigh their replica's mean loss by its share of the
  // global count; a failure before the step is shared with the replicas.
  LossFn scaled;  // outlives the step: the run keeps a pointer to it
  const LossFn* fn = &loss_fn;
  if (is_last()) {
    std::exception_ptr mine = local_error;
    double local = 0;
    if (!mine && loss_fn) {
      try {
        local = local_count(target, options_.chunks(), options);
      } catch (...) {
        mine = std::current_exception();
      }
    }
    std::exception_ptr other;
    const double share = replicas_->exchange_count(local, mine, other);
    local_error = mine ? mine : other;
    if (!local_error && loss_fn && options.reduction() == LossReduction::kMean &&
        share != 1.0) {
      scaled = [&loss_fn, share](const Batch& y, const Batch& t) {
        if (share == 0.0) {
          // Nothing of this replica's batch counts: its mean is 0/0, whose
          // gradient (nan) would poison the sum; its share is a zero still
          // attached to the output.
          torch::Tensor zero;
          for (const auto& o : y) {
            if (o.defined() && o.is_floating_point()) {
              auto term = o.sum() * 0.0;
              zero = zero.defined() ? zero + term : term;
            }
          }
          if (zero.defined()) {
            return zero;
          }
        }
        return loss_fn(y, t) * share;
      };
      fn = &scaled;
    }
  }
  torch::Tensor loss;
  std::exception_ptr error;
  last_origin_ = -1;
  try {
    loss = run_step(input, target, *fn, options, local_error);
  } catch (...) {
    error = std::current_exception();
  }
  return replicas_->end(loss, error, error ? last_origin_ : -1, grad);
}

torch::Tensor DistributedCore::run_step(const Batch& input, const Batch& target,
                                        const LossFn& loss_fn,
                                        const StepOptions& options,
                                        std::exception_ptr local_error) {
  std::lock_guard<std::mutex> call(call_mutex_);
  if (is_last() && !loss_fn && !local_error) {
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
  TiedStep tied(ties_.get());
  auto& run = state->run;
  // Everything after the header that may fail is a failure of the step: the
  // failure protocol tells the peers.
  std::exception_ptr error;
  torch::Tensor loss;
  try {
    if (is_last()) {
      prepare_loss(run, target, loss_fn, options);
    }
  } catch (...) {
    error = std::current_exception();
    protocol_.fail(*state, error, /*forward=*/true, /*backward=*/true);
  }
  if (!error) {
    error = run_cells(*state, /*forward=*/true, /*backward=*/run.grad);
  }
  if (!error && run.grad && (after_backward_ || replicas_)) {
    // This rank's gradients are complete; the others may still drain.
    try {
      if (replicas_) {
        replicas_->start();
      }
      if (after_backward_) {
        after_backward_();
      }
    } catch (...) {
      error = std::current_exception();  // nothing owed any more
    }
  }
  if (!error) {
    try {
      if (rank() == 0 && run.grad) {
        // Gradients of the input, if it asked for them, flow on from here.
        backward_into_input(input, run);
      }
      if (is_last()) {
        loss = weighted_loss(run);
      }
    } catch (...) {
      error = std::current_exception();  // nothing owed any more
    }
  }
  // Every rank learns who failed, and the loss of the last rank.
  last_origin_ = error ? (state->origin >= 0 ? state->origin : rank()) : -1;
  if (error && state->transport->kind == FailKind::kComm &&
      state->transport->lost_peer >= 0) {
    last_origin_ = state->transport->lost_peer;  // the replicas name it
  }
  const auto [value, dtype] = protocol_.agree(*state, error, loss, "step");
  tied.commit(run.grad);  // every rank's drain succeeded: sum (collective)
  end_forward();  // every rank succeeded: commit (DeferredBatchNorm)
  state->transport->grow_capacities(true, true);
  link_.flush();
  if (is_last()) {
    return loss;
  }
  return torch::tensor(value, torch::kDouble).to(static_cast<c10::ScalarType>(dtype));
}

// ---------------------------------------------------------------------------
Batch DistributedCore::forward(const Batch& input, bool training,
                               std::exception_ptr local_error) {
  std::shared_ptr<StepState> state;
  Batch out;
  {
    std::lock_guard<std::mutex> call(call_mutex_);
    TORCH_CHECK_VALUE(!replicas_, "a pipeline with data-parallel replicas "
                      "runs through step() only (module-style forward is not "
                      "supported with a dp group)");
    TORCH_CHECK_VALUE(options_.schedule() == ScheduleKind::kGPipe,
                      "module-style forward needs a fill/drain schedule "
                      "('gpipe'); '1f1b', 'zb-h1', 'zb-h2' and 'interleaved' "
                    "run only through step()");
    check_drained();
    placeholder_ = torch::Tensor();
    state = begin(Face::kModule, training, input, local_error);
    if (state->pre_error) {
      fail_early(*state);
    }
    auto error = run_cells(*state, /*forward=*/true, /*backward=*/false);
    if (!error) {
      try {
        if (is_last()) {
          out = gather(state->run.outputs);
        } else {
          out = {torch::zeros({}, torch::TensorOptions().device(stage()->device()))};
        }
      } catch (...) {
        error = std::current_exception();
      }
    }
    // Every rank raises, or none: a rank whose fill went well would
    // otherwise wait in a drain that never comes.
    finish_pass(*state, error, "forward");
    end_forward();  // every rank's fill succeeded
    if (!state->run.grad) {
      return out;
    }
    undrained_ = state;
  }
  auto step = c10::make_intrusive<RankStep>();
  step->core = shared_from_this();
  step->state = state;
  step->output = std::move(out);
  out = apply_pipeline_node(std::move(step), rank() == 0 ? input : Batch{});
  if (!is_last()) {
    std::lock_guard<std::mutex> call(call_mutex_);
    placeholder_ = out.front();
  }
  return out;
}

void DistributedCore::check_drained() {
  auto pending = undrained_.lock();
  if (!pending || pending->drained) {
    return;
  }
  std::exception_ptr error;
  try {
    TORCH_CHECK(false, "pipegear: rank ", rank(), ": the backward of the "
                "previous forward (step ", pending->seq, ") has not run; "
                "every rank must run it before the next forward (use "
                "no_grad for forwards without backward)");
  } catch (...) {
    error = std::current_exception();
  }
  abandon_drain(*pending, error);
}

Batch DistributedCore::drain(StepState& state, const Batch& grads) {
  std::lock_guard<std::mutex> call(call_mutex_);
  TORCH_CHECK(!state.abandoned, "pipegear: rank ", rank(), ": the backward of step ",
              state.seq, " comes after the next forward, which failed it on "
              "every rank (see that forward's error)");
  TORCH_CHECK(!state.drained, "pipegear: rank ", rank(), ": the backward of step ",
              state.seq, " ran twice");
  state.drained = true;
  placeholder_ = torch::Tensor();
  link_.check_not_broken();
  auto& run = state.run;
  at::ThreadLocalStateGuard tls(run.tls);
  // Set aside when the drain starts, not at the forward: until the drain
  // the user's .grad is the plain model's.
  TiedStep tied(ties_.get());
  std::exception_ptr error;
  try {
    if (is_last()) {
      split_output_grads(run, grads);
    } else {
      run.output_grads.assign(run.micro_batches, Batch{});
    }
  } catch (...) {
    error = std::current_exception();
    protocol_.fail(state, error, /*forward=*/false, /*backward=*/true);
  }
  if (!error) {
    error = run_cells(state, /*forward=*/false, /*backward=*/true);
  }
  Batch out;
  if (!error && rank() == 0) {
    out = gather_input_grads(run);
  }
  finish_pass(state, error, "backward");
  tied.commit(true);  // every rank's drain succeeded: sum (collective)
  return out;
}

void DistributedCore::abandon_drain(StepState& state,
                                    const std::exception_ptr& error) {
  state.drained = true;
  state.abandoned = true;
  placeholder_ = torch::Tensor();
  link_.check_not_broken();
  if (!link_.nccl()) {
    protocol_.post_agreement(state);
  }
  protocol_.fail(state, error, /*forward=*/false, /*backward=*/true);
  protocol_.agree(state, error, torch::Tensor(), "backward");
  std::rethrow_exception(error);  // agree rethrows it already
}

void DistributedCore::backward() {
  torch::Tensor p;
  {
    std::lock_guard<std::mutex> call(call_mutex_);
    TORCH_CHECK_VALUE(!is_last(), "pipegear: rank ", rank(), " is the "
                      "last rank: call backward on the loss of the output");
    TORCH_CHECK_VALUE(placeholder_.defined(), "pipegear: rank ", rank(),
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
    : DistributedPipeline(std::move(group),
                          std::vector<std::shared_ptr<Stage>>{std::move(stage)},
                          std::move(options)) {}

DistributedPipeline::DistributedPipeline(
    c10::intrusive_ptr<c10d::ProcessGroup> group,
    std::vector<std::shared_ptr<Stage>> stages, DistributedOptions options)
    : core_(std::make_shared<detail::DistributedCore>(
          std::move(group), std::move(stages), nullptr, std::move(options))) {}

DistributedPipeline::DistributedPipeline(
    c10::intrusive_ptr<c10d::ProcessGroup> group, std::shared_ptr<Stage> stage,
    EngineOptions options, std::chrono::milliseconds timeout)
    : DistributedPipeline(std::move(group), std::move(stage),
                          DistributedOptions()
                              .chunks(options.chunks())
                              .checkpoint(options.checkpoint())
                              .schedule(options.schedule())
                              .timeout(timeout)) {}

namespace {

// This rank's slices and stages, from the whole model or the factories.
struct Slice {
  torch::nn::Sequential part;  // every layer of this rank's stages
  std::vector<std::shared_ptr<Stage>> stages;  // one per virtual stage
  // Parameters this rank shares with others (the Sequential form only:
  // factories build each rank's layers apart).
  std::vector<detail::TiedParameter> ties;
};

// The stages of this rank (rank, rank + K, ...), each on a slice of the
// layers `layer` builds; `skips`: each stage's skip keys, by stage.
Slice slice_stages(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                   const DistributedOptions& options,
                   const std::function<torch::nn::AnyModule(int64_t)>& layer,
                   std::vector<StageSkipKeys> skips = {}) {
  Slice slice;
  const int64_t world = group->getSize();
  for (int64_t c = 0; c < options.virtual_stages(); ++c) {
    const int64_t stage = c * world + group->getRank();
    auto part = detail::slice_of(options.balance(), stage, layer);
    slice.stages.push_back(detail::make_stage(
        part, *group, options, stage,
        static_cast<size_t>(stage) < skips.size() ? std::move(skips[stage])
                                                  : StageSkipKeys{}));
    if (options.virtual_stages() == 1) {
      slice.part = part;
      break;
    }
    // The layers themselves (after a DeferredBatchNorm conversion), so
    // that the whole slice's parameters are the stages'.
    if (!slice.part) {
      slice.part = torch::nn::Sequential();
    }
    const auto names = part->named_children().keys();
    for (size_t i = 0; i < names.size(); ++i) {
      slice.part->push_back(names[i], *(part->begin() + static_cast<int64_t>(i)));
    }
  }
  return slice;
}

// Sets the options' skip routes when they are not given.
Slice slice_model(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                  const torch::nn::Sequential& model, DistributedOptions& options) {
  detail::check_group(group, options);
  TORCH_CHECK_VALUE(model && !model->is_empty(),
                    "the module to pipeline must be a non-empty Sequential");
  TORCH_CHECK_VALUE(!options.balance().empty(), "the Sequential form needs "
                    "DistributedOptions().balance(...), one entry per stage");
  check_balance(options.balance(), static_cast<int64_t>(model->size()));
  // Every rank holds the whole model: each finds the skips' routes itself
  // (the configuration agreement checks that they agree).
  auto layout = skip_layout(model, options.balance());
  if (options.skip_routes().empty()) {
    std::vector<int64_t> routes;
    for (size_t s = 0; s < layout.size(); ++s) {
      for (size_t i = 0; i < layout[s].stash_ids.size(); ++i) {
        const auto id = static_cast<size_t>(layout[s].stash_ids[i]);
        routes.resize(std::max(routes.size(), 2 * id + 2), -1);
        routes[2 * id] = static_cast<int64_t>(s);
      }
      for (size_t i = 0; i < layout[s].pop_ids.size(); ++i) {
        const auto id = static_cast<size_t>(layout[s].pop_ids[i]);
        routes.resize(std::max(routes.size(), 2 * id + 2), -1);
        routes[2 * id + 1] = static_cast<int64_t>(s);
      }
    }
    options.skip_routes(std::move(routes));
  }
  auto slice = slice_stages(
      group, options, [&](int64_t l) { return *(model->begin() + l); },
      std::move(layout));
  slice.ties = detail::find_tied_parameters(model, options.balance(),
                                            group->getRank(), group->getSize());
  return slice;
}

Slice slice_factories(const c10::intrusive_ptr<c10d::ProcessGroup>& group,
                      const std::vector<LayerFactory>& layers,
                      const DistributedOptions& options) {
  detail::check_group(group, options);
  TORCH_CHECK_VALUE(!layers.empty(), "the pipeline needs at least 1 layer factory");
  TORCH_CHECK_VALUE(!options.balance().empty(), "the factory form needs "
                    "DistributedOptions().balance(...), one entry per stage");
  check_balance(options.balance(), static_cast<int64_t>(layers.size()));
  return slice_stages(group, options, [&](int64_t l) {
    TORCH_CHECK_VALUE(static_cast<bool>(layers[l]), "layer factory ", l, " is empty");
    auto layer = layers[l]();
    TORCH_CHECK_VALUE(!layer.is_empty(), "layer factory ", l,
                      " returned an empty AnyModule");
    return layer;
  });
}

} // namespace

DistributedPipeline::DistributedPipeline(
    c10::intrusive_ptr<c10d::ProcessGroup> group,
    const torch::nn::Sequential& model, DistributedOptions options) {
  auto slice = slice_model(group, model, options);
  core_ = std::make_shared<detail::DistributedCore>(
      std::move(group), std::move(slice.stages), slice.part, std::move(options));
  core_->tie(std::move(slice.ties));
}

DistributedPipeline::DistributedPipeline(
    c10::intrusive_ptr<c10d::ProcessGroup> group,
    const std::vector<LayerFactory>& layers, DistributedOptions options) {
  auto slice = slice_factories(group, layers, options);
  core_ = std::make_shared<detail::DistributedCore>(
      std::move(group), std::move(slice.stages), slice.part, std::move(options));
}

DistributedPipeline::DistributedPipeline(
    c10::intrusive_ptr<c10d::ProcessGroup> group,
    c10::intrusive_ptr<c10d::ProcessGroup> dp_group,
    const std::vector<LayerFactory>& layers, DistributedOptions options,
    int64_t bucket_bytes) {
  TORCH_CHECK_VALUE(dp_group, "DistributedPipeline needs a dp group, got null");
  auto slice = slice_factories(group, layers, options);
  core_ = std::make_shared<detail::DistributedCore>(
      std::move(group), std::move(slice.stages), slice.part, std::move(options),
      std::move(dp_group), bucket_bytes);
}

DistributedPipeline::DistributedPipeline(
    c10::intrusive_ptr<c10d::ProcessGroup> group,
    c10::intrusive_ptr<c10d::ProcessGroup> dp_group,
    const torch::nn::Sequential& model, DistributedOptions options,
    int64_t bucket_bytes) {
  TORCH_CHECK_VALUE(dp_group, "DistributedPipeline needs a dp group, got null");
  auto slice = slice_model(group, model, options);
  // Both set a tied parameter's gradient aside around a step; how the two
  // compose is not built (the Python face ties with replicas).
  TORCH_CHECK_VALUE(slice.ties.empty(), "parameter '", slice.ties.empty() ? ""
                    : slice.ties.front().name, "' is held by several ranks "
                    "(tied): the C++ DistributedPipeline does not tie "
                    "parameters across ranks together with replicas (a dp "
                    "group); use the Python DistributedGPipe");
  core_ = std::make_shared<detail::DistributedCore>(
      std::move(group), std::move(slice.stages), slice.part, std::move(options),
      std::move(dp_group), bucket_bytes);
}

DistributedPipeline::DistributedPipeline(
    c10::intrusive_ptr<c10d::ProcessGroup> group,
    c10::intrusive_ptr<c10d::ProcessGroup> dp_group, std::shared_ptr<Stage> stage,
    std::vector<torch::Tensor> parameters, std::vector<torch::Tensor> buffers,
    DistributedOptions options, int64_t bucket_bytes) {
  TORCH_CHECK_VALUE(dp_group, "DistributedPipeline needs a dp group, got null");
  core_ = std::make_shared<detail::DistributedCore>(
      std::move(group), std::vector<std::shared_ptr<Stage>>{std::move(stage)},
      nullptr, std::move(options), std::move(dp_group), bucket_bytes,
      std::make_pair(std::move(parameters), std::move(buffers)));
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
int64_t DistributedPipeline::replica() const { return core_->replica(); }
int64_t DistributedPipeline::replicas() const { return core_->replicas(); }
const DistributedOptions& DistributedPipeline::options() const {
  return core_->options();
}
const std::shared_ptr<Stage>& DistributedPipeline::stage() const {
  return core_->stage();
}
const std::vector<std::shared_ptr<Stage>>& DistributedPipeline::stages() const {
  return core_->stages();
}
torch::nn::Sequential DistributedPipeline::module() const {
  return core_->module();
}
bool DistributedPipeline::broken() const { return core_->broken(); }
void DistributedPipeline::set_after_backward(std::function<void()> hook) {
  core_->set_after_backward(std::move(hook));
}
void DistributedPipeline::set_before_last_backward(std::function<void()> hook) {
  core_->set_before_last_backward(std::move(hook));
}
std::vector<TraceEvent> DistributedPipeline::last_events() const {
  return core_->last_events();
}

} // namespace pipegear
