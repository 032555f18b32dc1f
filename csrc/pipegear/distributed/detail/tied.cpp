#include <pipegear/distributed/detail/tied.h>

#include <algorithm>
#include <map>

#include <torch/torch.h>

namespace pipegear::detail {

std::vector<TiedParameter> find_tied_parameters(
    const torch::nn::Sequential& model, const std::vector<int64_t>& balance,
    int64_t rank, int64_t world) {
  std::map<const c10::TensorImpl*, size_t> index;
  std::vector<TiedParameter> all;
  int64_t layer = 0;
  for (int64_t s = 0; s < static_cast<int64_t>(balance.size()); ++s) {
    const int64_t r = s % world;
    for (int64_t i = 0; i < balance[s]; ++i, ++layer) {
      const auto& module = *(model->begin() + layer);
      for (const auto& p : module.ptr()->named_parameters()) {
        const auto* impl = p.value().unsafeGetTensorImpl();
        auto [it, fresh] = index.emplace(impl, all.size());
        if (fresh) {
          all.push_back({torch::Tensor(), p.value().sizes().vec(),
                         p.value().scalar_type(), {},
                         std::to_string(layer) + "." + p.key()});
        }
        auto& tie = all[it->second];
        if (std::find(tie.ranks.begin(), tie.ranks.end(), r) == tie.ranks.end()) {
          tie.ranks.insert(std::upper_bound(tie.ranks.begin(), tie.ranks.end(), r), r);
        }
        if (r == rank) {
          tie.local = p.value();
        }
      }
    }
  }
  std::vector<TiedParameter> ties;
  for (auto& t : all) {
    if (t.ranks.size() > 1) {
      ties.push_back(std::move(t));
    }
  }
  return ties;
}

void TiedAcrossRanks::sum(torch::Tensor& t, const std::string& what) {
  std::vector<at::Tensor> v{t.to(link_.device())};
  wait_collective(link_.allreduce(v, what), link_.rank(), link_.timeout(), what);
  t = v[0];
}

void TiedAcrossRanks::start() {
  // Every rank built the same model, so every rank finds the same ties; a
  // rank that did not (another model, another balance) must fail here,
  // not hang in a collective of another size.
  const int64_t world = link_.world(), rank = link_.rank();
  int64_t numel = 0;
  for (const auto& t : ties_) {
    numel += c10::multiply_integers(t.sizes);
  }
  auto layout = torch::zeros({world, 2}, torch::kInt64);
  layout[rank][0] = static_cast<int64_t>(ties_.size());
  layout[rank][1] = numel;
  sum(layout, "checking that every rank ties the same parameters");
  layout = layout.cpu();
  for (int64_t r = 0; r < world; ++r) {
    TORCH_CHECK_VALUE(
        layout[r][0].item<int64_t>() == static_cast<int64_t>(ties_.size()) &&
            layout[r][1].item<int64_t>() == numel,
        "rank ", rank, " finds ", ties_.size(), " parameters tied across "
        "ranks (", numel, " elements) in its model, rank ", r, " finds ",
        layout[r][0].item<int64_t>(), " (", layout[r][1].item<int64_t>(),
        " elements): every rank must build the same Sequential");
  }
  torch::NoGradGuard no_grad;
  for (auto& t : ties_) {
    auto value = t.local.defined() && t.ranks.front() == rank
        ? t.local.detach().clone()
        : torch::zeros(t.sizes, torch::TensorOptions().dtype(t.dtype));
    sum(value, "giving the tied parameter '" + t.name + "' the value of rank " +
                   std::to_string(t.ranks.front()));
    if (t.local.defined()) {
      t.local.copy_(value);
    }
  }
}

void TiedAcrossRanks::begin() {
  if (!stashed_.empty()) {
    end(false);  // a pass that failed before its end set them aside
  }
  for (auto& t : ties_) {
    stashed_.push_back(t.local.defined() ? t.local.grad() : torch::Tensor());
    if (t.local.defined() && t.local.grad().defined()) {
      t.local.mutable_grad() = torch::Tensor();
    }
  }
}

void TiedAcrossRanks::end(bool ok) {
  torch::NoGradGuard no_grad;
  auto stashed = std::move(stashed_);
  stashed_.clear();
  stashed.resize(ties_.size());
  for (size_t i = 0; i < ties_.size(); ++i) {
    auto& t = ties_[i];
    torch::Tensor grad = t.local.defined() ? t.local.grad() : torch::Tensor();
    if (ok) {
      if (!grad.defined()) {
        grad = torch::zeros(t.sizes, torch::TensorOptions().dtype(t.dtype));
      }
      sum(grad, "summing the gradient of the tied parameter '" + t.name + "'");
      if (!t.local.defined() || !t.local.requires_grad()) {
        grad = torch::Tensor();
      } else {
        grad = grad.to(t.local.device());
      }
    }
    if (!t.local.defined()) {
      continue;
    }
    if (stashed[i].defined() && grad.defined()) {
      grad = stashed[i].add_(grad);
    } else if (stashed[i].defined()) {
      grad = stashed[i];
    }
    t.local.mutable_grad() = grad;
  }
}

} // namespace pipegear::detail
