// One rank's point-to-point messaging over c10d: see link.h.
#include <pipegear/distributed/detail/link.h>

#include <algorithm>
#include <map>
#include <sstream>
#include <utility>

#include <pipegear/distributed/detail/wire.h>

namespace pipegear::detail {

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

std::string closed_by(int64_t peer) {
  return " (did rank " + std::to_string(peer) +
      " die, or time out waiting for a rank?)";
}

std::string seconds(std::chrono::milliseconds t) {
  std::ostringstream s;
  s << static_cast<double>(t.count()) / 1000.0 << " s";
  return s.str();
}

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

void wait_collective(const c10::intrusive_ptr<c10d::Work>& work, int64_t rank,
                     std::chrono::milliseconds timeout, const std::string& what) {
  const WaitResult r = wait_work(work, timeout);
  TORCH_CHECK(r.ok(), "pipegear: rank ", rank, ": ", what,
              r.timed_out()
                  ? " timed out after " + seconds(timeout) +
                      " (a rank died, hangs or does not make the same call)"
                  : " failed: " + r.error);
}

namespace {

// The initial capacity of a Gloo link (see C10dTransport).
constexpr int64_t kMinCapacity = 64 * 1024;

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

// The tags of a pipeline of `chunks`; ValueError when they do not fit.
// " in step N", or nothing outside a step.
std::string in_step(int64_t step) {
  return step < 0 ? std::string() : " in step " + std::to_string(step);
}

int64_t tag_stride(int64_t chunks) {
  const int64_t stride = 2 * chunks + kTagKinds;
  TORCH_CHECK_VALUE(stride < kTags, "chunks must be below ", kTags / 2, ", got ",
                    chunks);
  return stride;
}

// The first tag of a new range of `length` tags on `group`.
int64_t free_tags(const void* group, int64_t length) {
  std::lock_guard<std::mutex> lock(tag_mutex());
  const int64_t base = next_tags()[group];
  return base + length > kTags ? 0 : base;
}

} // namespace

Link::Link(c10::intrusive_ptr<c10d::ProcessGroup> group, c10::Device device,
           int64_t chunks, std::chrono::milliseconds timeout, int64_t skips)
    : group_(std::move(group)),
      rank_(group_->getRank()),
      world_(group_->getSize()),
      nccl_(group_->getBackendName() == "nccl"),
      device_(device),
      chunks_(chunks),
      timeout_(timeout),
      tags_(tag_stride(chunks) + 2 * skips * chunks),
      tag_base_(free_tags(group_.get(), tags_)),
      send_capacity_{kMinCapacity, kMinCapacity},
      recv_capacity_{kMinCapacity, kMinCapacity} {}

void Link::take_tags() {
  std::lock_guard<std::mutex> lock(tag_mutex());
  next_tags()[group_.get()] = tag_base_ + tags_;
}

int64_t Link::capacity(bool backward, bool send) const {
  if (nccl_) {
    return kHeaderBytes;
  }
  return send ? send_capacity_[backward] : recv_capacity_[backward];
}

void Link::grow(bool backward, int64_t largest_sent, int64_t largest_received) {
  auto round = [](int64_t n) { return (n + 4095) / 4096 * 4096; };
  send_capacity_[backward] = std::max(send_capacity_[backward], round(largest_sent));
  recv_capacity_[backward] =
      std::max(recv_capacity_[backward], round(largest_received));
}

void Link::fail(const std::string& doing, int64_t peer, OnError on_error) {
  const std::string error = describe(std::current_exception());
  if (on_error == OnError::kBreak) {
    mark_broken(doing + " failed: " + error);
  }
  TORCH_CHECK(false, "pipegear: rank ", rank_, ": ", doing, " failed",
              peer < 0 ? std::string() : closed_by(peer), ": ", error);
}

void Link::send(const torch::Tensor& t, int64_t dst, int tag, const std::string& what,
                int64_t step, OnError on_error) {
  std::vector<at::Tensor> v{t};
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = group_->send(v, static_cast<int>(dst), tag);
  } catch (const std::exception&) {
    fail("sending " + what + " to rank " + std::to_string(dst) + in_step(step), dst,
         on_error);
  }
  pending_.push_back(
      {std::move(work), dst, what + " to rank " + std::to_string(dst) + in_step(step)});
}

c10::intrusive_ptr<c10d::Work> Link::recv(const torch::Tensor& t, int64_t src, int tag,
                                          const std::string& doing, int64_t step,
                                          OnError on_error) {
  std::vector<at::Tensor> v{t};
  try {
    return group_->recv(v, static_cast<int>(src), tag);
  } catch (const std::exception&) {
    fail(doing + in_step(step), src, on_error);
  }
}

c10::intrusive_ptr<c10d::Work> Link::allreduce(std::vector<at::Tensor>& v,
                                               const std::string& doing) {
  c10d::AllreduceOptions o;
  o.timeout = timeout_;
  try {
    return group_->allreduce(v, o);
  } catch (const std::exception&) {
    fail(doing, -1, OnError::kBreak);
  }
}

void Link::wait(const c10::intrusive_ptr<c10d::Work>& work, int64_t peer,
                const std::string& doing, int64_t step) {
  const WaitResult r = wait_work(work, timeout_);
  const std::string& error = r.error;
  TORCH_CHECK(!r.timed_out(), "pipegear: rank ", rank_, ": ", doing, in_step(step),
              " timed out after ", seconds(timeout_), " (did rank ", peer,
              " die, hang or skip the call?)", error.empty() ? "" : ": " + error);
  TORCH_CHECK(error.empty(), "pipegear: rank ", rank_, ": ", doing, in_step(step),
              " failed", closed_by(peer), ": ", error);
}

void Link::prune() {
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

void Link::flush() {
  auto pending = std::move(pending_);
  pending_.clear();
  for (auto& p : pending) {
    try {
      wait_collective(p.work, rank_, timeout_, "sending " + p.what);
    } catch (...) {
      mark_broken("sending " + p.what + " did not complete");
      throw;
    }
  }
}

void Link::mark_broken(const std::string& why) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!broken_) {
    broken_ = true;
    broken_reason_ = why;
  }
}

bool Link::broken() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return broken_;
}

std::string Link::broken_reason() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return broken_reason_;
}

void Link::check_not_broken() const {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(!broken_, "pipegear: rank ", rank_, ": an earlier step failed "
              "and left the process group in an unknown state (",
              broken_reason_, "); destroy the group and start again");
}

} // namespace pipegear::detail
