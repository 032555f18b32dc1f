// One rank's side of the data-parallel replicas of a distributed pipeline
// (replicas.h). Every collective here is over this stage's dp group, in
// the same order on every replica: a replica whose step failed still makes
// them (with zeros), so that the group stays in step.
#include <pipegear/distributed/detail/replicas.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>

#include <pipegear/distributed/detail/link.h>

namespace pipegear::detail {

namespace {

// What every replica must agree on, as numbers: a configuration field per
// entry, then each parameter's and buffer's element count and dtype.
std::vector<int64_t> configuration(int64_t stages, const DistributedOptions& o,
                                   const std::vector<torch::Tensor>& params,
                                   const std::vector<torch::Tensor>& buffers) {
  std::vector<int64_t> c{stages, o.chunks(), static_cast<int64_t>(o.checkpoint()),
                         static_cast<int64_t>(o.schedule()),
                         static_cast<int64_t>(params.size()),
                         static_cast<int64_t>(buffers.size())};
  for (const auto* list : {&params, &buffers}) {
    for (const auto& t : *list) {
      c.push_back(t.numel());
      c.push_back(static_cast<int64_t>(t.scalar_type()));
    }
  }
  return c;
}

const char* kFields[] = {"the number of stages", "chunks", "checkpoint", "schedule",
                         "the number of parameters", "the number of buffers"};

std::string field_name(size_t i) {
  if (i < 6) {
    return kFields[i];
  }
  return "the size or dtype of parameter/buffer " + std::to_string((i - 6) / 2);
}

} // namespace

std::string Replicas::where(int64_t dp, int64_t pp) {
  return "(dp=" + std::to_string(dp) + ", pp=" + std::to_string(pp) + ")";
}

Replicas::Replicas(c10::intrusive_ptr<c10d::ProcessGroup> dp, int64_t stage,
                   int64_t stages, std::vector<torch::Tensor> params,
                   std::vector<torch::Tensor> buffers, const DistributedOptions& options,
                   int64_t bucket_bytes)
    : dp_(std::move(dp)),
      stage_(stage),
      stages_(stages),
      replica_(dp_->getRank()),
      replicas_(dp_->getSize()),
      timeout_(options.timeout()),
      idle_timeout_(options.idle_timeout()),
      params_(std::move(params)) {
  TORCH_CHECK_VALUE(bucket_bytes > 0, "the bucket size must be positive, got ",
                    bucket_bytes);
  const std::string me = where(replica_, stage_);
  // The configurations, padded to the longest (the lengths differ when
  // the parameters do).
  const auto mine = configuration(stages, options, params_, buffers);
  auto length = torch::tensor({static_cast<int64_t>(mine.size())}, torch::kLong);
  int64_t longest = 0;
  for (const auto& l : gather(length, idle_timeout_, "the configuration's length")) {
    longest = std::max(longest, l.item<int64_t>());
  }
  auto padded = torch::full({longest + 1}, -1, torch::kLong);
  padded[0] = static_cast<int64_t>(mine.size());
  for (size_t i = 0; i < mine.size(); ++i) {
    padded[static_cast<int64_t>(i) + 1] = mine[i];
  }
  const auto every = gather(padded, timeout_, "the configuration");
  for (int64_t d = 0; d < replicas_; ++d) {
    auto other = every[d];
    for (int64_t i = 0; i <= longest; ++i) {
      const auto a = other[i].item<int64_t>();
      const auto b = padded[i].item<int64_t>();
      TORCH_CHECK_VALUE(a == b, "pipegear: replicas disagree on ",
                        i == 0 ? std::string("the number of parameters and buffers")
                               : field_name(static_cast<size_t>(i - 1)),
                        ": ", a, " on ", where(d, stage_), " but ", b, " on ", me,
                        "; every replica must build the same pipeline");
    }
  }
  // Every replica starts from the first one's values.
  {
    torch::NoGradGuard no_grad;
    c10d::BroadcastOptions o;
    o.rootRank = 0;
    o.timeout = timeout_;
    for (const auto* list : {&params_, &buffers}) {
      for (const auto& t : *list) {
        std::vector<at::Tensor> v{t.detach()};
        wait(dp_->broadcast(v, o), timeout_, "the broadcast of replica 0's values");
      }
    }
  }
  // Buckets, last layers first (the order the drain produces them).
  std::vector<size_t> current;
  int64_t size = 0;
  for (size_t k = params_.size(); k-- > 0;) {
    const auto& p = params_[k];
    if (!p.requires_grad()) {
      continue;
    }
    const int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size());
    if (!current.empty() &&
        (size + bytes > bucket_bytes || params_[current[0]].scalar_type() != p.scalar_type() ||
         params_[current[0]].device() != p.device())) {
      buckets_.push_back(std::move(current));
      current.clear();
      size = 0;
    }
    current.push_back(k);
    size += bytes;
  }
  if (!current.empty()) {
    buckets_.push_back(std::move(current));
  }
}

void Replicas::begin() {
  stash_.clear();
  for (auto& p : params_) {
    stash_.push_back(p.grad());
    p.mutable_grad() = torch::Tensor();
  }
  pending_.clear();
  started_ = false;
}

double Replicas::exchange_count(double local, const std::exception_ptr& mine,
                                std::exception_ptr& other) {
  auto t = torch::tensor({local, mine ? 1.0 : 0.0}, torch::kDouble);
  const auto every = gather(t, idle_timeout_ + timeout_, "the counts of the replicas' losses");
  double total = 0;
  int64_t failed = -1;
  bool any = false;
  for (int64_t d = 0; d < replicas_; ++d) {
    total += every[d][0].item<double>();
    if (every[d][1].item<double>() != 0) {
      any = true;
      if (d != replica_ && failed < 0) {
        failed = d;
      }
    }
  }
  if (any) {
    // Every replica knows one failed: all of them gather the texts.
    std::string text = mine ? describe(mine) : std::string();
    auto n = torch::tensor({static_cast<int64_t>(text.size())}, torch::kLong);
    int64_t longest = 0;
    for (const auto& l : gather(n, timeout_, "the length of a failure's text")) {
      longest = std::max(longest, l.item<int64_t>());
    }
    auto bytes = torch::zeros({longest + 1}, torch::kByte);
    std::copy(text.begin(), text.end(), bytes.data_ptr<uint8_t>());
    const auto texts = gather(bytes, timeout_, "the text of a failure");
    if (failed >= 0) {
      const auto* b = texts[failed].data_ptr<uint8_t>();
      const std::string theirs(reinterpret_cast<const char*>(b));
      try {
        TORCH_CHECK_VALUE(false, "pipegear: ", where(replica_, stage_), ": ",
                          where(failed, stage_), " failed before the step: ", theirs);
      } catch (...) {
        other = std::current_exception();
      }
    }
    return 0.0;
  }
  return total > 0 ? local / total : std::nan("");
}

void Replicas::start() {
  if (started_) {
    return;
  }
  started_ = true;
  torch::NoGradGuard no_grad;
  c10d::AllreduceOptions o;
  o.timeout = timeout_;
  for (const auto& bucket : buckets_) {
    // The gradients, then one flag per parameter: whether this replica has
    // a gradient for it (a parameter no replica used keeps none, as in the
    // plain model, not zeros that weight decay or momentum would move).
    std::vector<torch::Tensor> parts;
    std::vector<double> has;
    for (auto k : bucket) {
      const auto& p = params_[k];
      const auto& g = p.grad();
      parts.push_back((g.defined() ? g : torch::zeros_like(p)).reshape(-1));
      has.push_back(g.defined() ? 1.0 : 0.0);
    }
    const auto& first = params_[bucket.front()];
    parts.push_back(torch::tensor(has, torch::kDouble)
                        .to(first.device(), first.scalar_type()));
    auto flat = torch::cat(parts);
    std::vector<at::Tensor> v{flat};
    c10::intrusive_ptr<c10d::Work> work;
    try {
      work = dp_->allreduce(v, o);
    } catch (const std::exception& e) {
      lost("starting the gradient sum", e.what());
    }
    pending_.push_back({bucket, flat, work});
  }
}

torch::Tensor Replicas::end(const torch::Tensor& loss, const std::exception_ptr& error,
                            int64_t origin, bool grad) {
  auto stash = std::move(stash_);
  stash_.clear();
  std::vector<torch::Tensor> every;
  try {
    TORCH_CHECK(!broken_, "pipegear: ", where(replica_, stage_), ": the replicas of "
                "this stage lost a peer in an earlier step: destroy the process "
                "groups and restart");
    if (grad) {
      // A rank whose step failed takes part with zeros.
      start();
    }
    const double value = loss.defined() && !error ? loss.item<double>() : 0.0;
    auto mine = torch::tensor({error ? 1.0 : 0.0,
                               static_cast<double>(error ? (origin >= 0 ? origin : -1) : -1),
                               value},
                              torch::kDouble);
    every = gather(mine, 2 * timeout_, "the outcome of the step");
    for (auto& p : pending_) {
      wait(p.work, timeout_, "the gradient sum");
    }
  } catch (...) {
    pending_.clear();
    restore(stash);
    if (error) {
      std::rethrow_exception(error);
    }
    throw;
  }
  auto pending = std::move(pending_);
  pending_.clear();
  if (error) {
    restore(stash);
    std::rethrow_exception(error);
  }
  for (int64_t d = 0; d < replicas_; ++d) {
    if (every[d][0].item<double>() != 0) {
      restore(stash);
      const auto pp = static_cast<int64_t>(every[d][1].item<double>());
      TORCH_CHECK(false, "pipegear: ", where(replica_, stage_), ": the step failed on ",
                  pp >= 0 ? "rank " + where(d, pp) : "replica " + std::to_string(d),
                  " (replica ", d, "'s pipeline raised; see that rank's error)");
    }
  }
  {
    torch::NoGradGuard no_grad;
    for (auto& p : pending) {
      int64_t offset = 0;
      const auto count = static_cast<int64_t>(p.params.size());
      const auto flags = p.flat.slice(0, p.flat.numel() - count).cpu();
      for (int64_t i = 0; i < count; ++i) {
        auto& param = params_[p.params[i]];
        const int64_t n = param.numel();
        param.mutable_grad() =
            flags[i].item<double>() > 0
                ? p.flat.slice(0, offset, offset + n).view_as(param).clone()
                : torch::Tensor();
        offset += n;
      }
    }
  }
  restore(stash);
  if (!loss.defined()) {
    return loss;
  }
  double sum = 0;
  for (const auto& e : every) {
    sum += e[2].item<double>();
  }
  return torch::tensor(sum, torch::kDouble).to(loss.scalar_type());
}

void Replicas::restore(std::vector<torch::Tensor>& stash) {
  for (size_t k = 0; k < params_.size() && k < stash.size(); ++k) {
    auto& before = stash[k];
    if (!before.defined()) {
      continue;
    }
    auto& g = params_[k].mutable_grad();
    g = g.defined() ? before.add_(g) : before;
  }
}

std::vector<torch::Tensor> Replicas::gather(const torch::Tensor& mine,
                                            std::chrono::milliseconds timeout,
                                            const std::string& what) {
  std::vector<std::vector<at::Tensor>> out(1);
  for (int64_t d = 0; d < replicas_; ++d) {
    out[0].push_back(torch::empty_like(mine));
  }
  std::vector<at::Tensor> in{mine};
  c10d::AllgatherOptions o;
  o.timeout = timeout;
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = dp_->allgather(out, in, o);
  } catch (const std::exception& e) {
    lost(what, e.what());
  }
  wait(work, timeout, what);
  return out[0];
}

void Replicas::wait(const c10::intrusive_ptr<c10d::Work>& work,
                    std::chrono::milliseconds timeout, const std::string& what) {
  const WaitResult r = wait_work(work, timeout);
  if (!r.ok()) {
    lost(what, r.timed_out() ? "timed out after " + seconds(timeout) : r.error);
  }
}

void Replicas::lost(const std::string& what, const std::string& error) {
  broken_ = true;
  std::string peers;
  for (int64_t d = 0; d < replicas_; ++d) {
    if (d != replica_) {
      peers += (peers.empty() ? "" : ", ") + where(d, stage_);
    }
  }
  TORCH_CHECK(false, "pipegear: ", where(replica_, stage_), ": ", what,
              " with the other replicas of stage ", stage_, " (", peers,
              ") failed: a replica is lost or hangs: ", error);
}

double local_count(const Batch& target, int64_t chunks, const StepOptions& options) {
  if (options.reduction() == LossReduction::kSum) {
    return 0;
  }
  TORCH_CHECK_VALUE(!target.empty(), "with data-parallel replicas a mean loss needs "
                    "the target on the last rank: its rows (or count) weigh this "
                    "replica's share of the global batch");
  const auto sizes = chunk_sizes(batch_size(target), chunks);
  if (!options.count()) {
    return static_cast<double>(batch_size(target));
  }
  std::vector<Batch> parts(sizes.size());
  for (const auto& t : target) {
    auto split = t.split_with_sizes(sizes, 0);
    for (size_t j = 0; j < sizes.size(); ++j) {
      parts[j].push_back(split[j]);
    }
  }
  double total = 0;
  for (auto& part : parts) {
    part.tuple = target.tuple;
    total += options.count()(part);
  }
  return total;
}

} // namespace pipegear::detail
