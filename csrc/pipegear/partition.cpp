#include <pipegear/partition.h>

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <limits>

#include <c10/util/Exception.h>

// The partitioner, in two exact steps (docs/balance.md has the narrative).
//
// 1. Bottleneck. With prefix sums P, a stage of layers [i, j) costs
//    P[j] - P[i]. Whether every stage can cost at most B is monotone in B and
//    decided in O(K log L) by the greedy that makes each stage as long as it
//    may (any sub-range of an allowed stage is allowed, so the greedy needs
//    the fewest stages). The smallest feasible B is a double: bisecting over
//    the bit patterns of the non-negative doubles, which are ordered as
//    integers, finds it exactly in at most 64 checks (compare parametric
//    search, Frederickson 1991, which is exact over the O(L^2) candidate
//    costs at a far higher price in code).
//
// 2. Variance. Among splits with every stage <= B*, the one with the least
//    sum of squared stage costs: f[k][j] = min_i f[k-1][i] + (P[j]-P[i])^2
//    over the allowed i, an interval [lo(j), j-1] whose ends never decrease.
//    (P[j]-P[i])^2 is Monge (P is non-decreasing) and stays Monge on such a
//    staircase, so the optimal i never decreases with j and each row of the
//    table takes O(L log L) by divide and conquer (Galil & Park 1992) instead
//    of O(L^2). The key is lexicographic: (sum of squared costs, sum of
//    squared layer counts), both Monge, then the largest i.

namespace pipegear {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

void check_values(const std::vector<double>& values, const char* what) {
  for (size_t i = 0; i < values.size(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(values[i]) && values[i] >= 0, what, "[",
                      i, "] must be a finite number >= 0, got ", values[i]);
  }
}

std::vector<double> prefix_sums(const std::vector<double>& values) {
  std::vector<double> p(values.size() + 1, 0.0);
  for (size_t i = 0; i < values.size(); ++i) {
    p[i + 1] = p[i] + values[i];
  }
  return p;
}

// The end of the longest stage from `i` whose cost p[j] - p[i] is <= bound.
int64_t reach(const std::vector<double>& p, int64_t i, double bound) {
  int64_t lo = i;  // p[lo] - p[i] <= bound always holds for lo = i
  int64_t hi = static_cast<int64_t>(p.size()) - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (p[mid] - p[i] <= bound) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Whether `partitions` stages can each cost <= bound (on p) and end no later
// than limit[i] when they start at i.
bool feasible(int64_t partitions,
              const std::vector<double>& p,
              double bound,
              const std::vector<int64_t>& limit) {
  const int64_t n = static_cast<int64_t>(p.size()) - 1;
  int64_t i = 0;
  for (int64_t stages = 0; i < n; ++stages) {
    if (stages == partitions) {
      return false;
    }
    const int64_t j = std::min(reach(p, i, bound), limit[i]);
    if (j == i) {
      return false;
    }
    i = j;
  }
  return true;
}

// The smallest double bound in [0, p.back()] for which feasible() holds; it
// holds at p.back() by the caller's check.
double min_feasible_bound(int64_t partitions,
                          const std::vector<double>& p,
                          const std::vector<int64_t>& limit) {
  uint64_t lo = std::bit_cast<uint64_t>(0.0);
  uint64_t hi = std::bit_cast<uint64_t>(p.back());
  while (lo < hi) {
    const uint64_t mid = lo + (hi - lo) / 2;
    if (feasible(partitions, p, std::bit_cast<double>(mid), limit)) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return std::bit_cast<double>(lo);
}

// The DP of step 2 for stages of at most `bound` cost and `cap` memory.
class VarianceDP {
 public:
  VarianceDP(int64_t partitions,
             const std::vector<double>& p,
             const std::vector<int64_t>& lo,
             double tie)
      : k_(partitions),
        n_(static_cast<int64_t>(p.size()) - 1),
        p_(p),
        lo_(lo),
        tie_(tie) {}

  std::vector<int64_t> solve() {
    // mins[j]: the fewest stages that cover layers [0, j). Columns j of
    // row k are those with mins[j] <= k <= j that leave a layer for each
    // later stage, an interval [k, last_[k]].
    std::vector<int64_t> mins(n_ + 1, 0);
    for (int64_t j = 1; j <= n_; ++j) {
      mins[j] = 1 + mins[lo_[j]];
    }
    last_.assign(k_ + 1, 0);
    for (int64_t k = 1; k <= k_; ++k) {
      int64_t j = n_ - (k_ - k);
      while (mins[j] > k) {
        --j;
      }
      TORCH_INTERNAL_ASSERT(j >= k, "no split at stage ", k);
      last_[k] = j;
    }
    TORCH_INTERNAL_ASSERT(last_[k_] == n_);

    prev_v_.assign(n_ + 1, kInf);
    prev_n_.assign(n_ + 1, 0);
    prev_v_[0] = 0.0;
    cur_v_ = prev_v_;
    cur_n_ = prev_n_;
    arg_.resize(k_ + 1);
    for (k_row_ = 1; k_row_ <= k_; ++k_row_) {
      const int64_t first = k_row_;
      arg_[k_row_].assign(last_[k_row_] - first + 1, 0);
      const int64_t rows_first = k_row_ - 1;
      const int64_t rows_last = k_row_ == 1 ? 0 : last_[k_row_ - 1];
      solve_row(first, last_[k_row_], rows_first, rows_last);
      std::swap(prev_v_, cur_v_);
      std::swap(prev_n_, cur_n_);
    }

    std::vector<int64_t> sizes(k_);
    int64_t j = n_;
    for (int64_t k = k_; k >= 1; --k) {
      const int64_t i = arg_[k][j - k];
      sizes[k - 1] = j - i;
      j = i;
    }
    TORCH_INTERNAL_ASSERT(j == 0);
    return sizes;
  }

 private:
  // Fills columns [jl, jr] of the current row; their optimal i lies in
  // [il, ir] (divide and conquer on the monotone argmin).
  void solve_row(int64_t jl, int64_t jr, int64_t il, int64_t ir) {
    if (jl > jr) {
      return;
    }
    const int64_t j = jl + (jr - jl) / 2;
    const int64_t a = std::max(il, lo_[j]);
    const int64_t b = std::min(ir, j - 1);
    TORCH_INTERNAL_ASSERT(a <= b, "empty candidate range for layer ", j);
    double best_v = kInf;
    for (int64_t i = a; i <= b; ++i) {
      best_v = std::min(best_v, value(i, j));
    }
    // Among values within the tie tolerance of the minimum: the fewest
    // squared layers, then the largest i (the shortest last stage).
    int64_t best_i = -1;
    int64_t best_n = 0;
    for (int64_t i = a; i <= b; ++i) {
      if (value(i, j) <= best_v + tie_) {
        const int64_t n = prev_n_[i] + (j - i) * (j - i);
        if (best_i < 0 || n <= best_n) {
          best_i = i;
          best_n = n;
        }
      }
    }
    cur_v_[j] = value(best_i, j);
    cur_n_[j] = best_n;
    arg_[k_row_][j - k_row_] = best_i;
    solve_row(jl, j - 1, il, best_i);
    solve_row(j + 1, jr, best_i, ir);
  }

  double value(int64_t i, int64_t j) const {
    const double c = p_[j] - p_[i];
    return prev_v_[i] + c * c;
  }

  int64_t k_;
  int64_t n_;
  const std::vector<double>& p_;
  const std::vector<int64_t>& lo_;
  double tie_;
  int64_t k_row_ = 0;
  std::vector<int64_t> last_;
  std::vector<double> prev_v_, cur_v_;
  std::vector<int64_t> prev_n_, cur_n_;
  std::vector<std::vector<int32_t>> arg_;
};

} // namespace

std::vector<int64_t> balance_by_cost(int64_t partitions,
                                     const std::vector<double>& costs,
                                     const std::vector<double>& memory,
                                     std::optional<double> capacity) {
  const int64_t n = static_cast<int64_t>(costs.size());
  TORCH_CHECK_VALUE(n >= 1, "balance_by_cost needs the cost of at least one "
                    "layer, got none");
  TORCH_CHECK_VALUE(partitions >= 1, "partitions must be at least 1, got ",
                    partitions);
  TORCH_CHECK_VALUE(partitions <= n, "cannot split ", n, " layers into ",
                    partitions, " partitions: each needs at least one layer");
  check_values(costs, "costs");
  TORCH_CHECK_VALUE(memory.empty() || memory.size() == costs.size(),
                    "memory must give one value per layer: ", costs.size(),
                    " costs but ", memory.size(), " memory values");
  check_values(memory, "memory");
  TORCH_CHECK_VALUE(!capacity || !memory.empty(),
                    "a capacity needs the memory of every layer, got a "
                    "capacity of ", *capacity, " without memory");
  TORCH_CHECK_VALUE(!capacity || !std::isnan(*capacity),
                    "capacity must be a number, got NaN");

  // The rounding bound of a prefix sum of n terms, relative to the total.
  const double rel = static_cast<double>(n) * DBL_EPSILON;
  const auto p = prefix_sums(costs);

  // limit[i]: where a stage starting at i must end at the latest for memory.
  std::vector<int64_t> limit(n + 1, n);
  double cap_tol = kInf;
  std::vector<double> pm;
  if (capacity) {
    pm = prefix_sums(memory);
    cap_tol = *capacity + pm.back() * rel;
    const std::vector<int64_t> none(n + 1, n);
    if (!feasible(partitions, pm, cap_tol, none)) {
      const double need = min_feasible_bound(partitions, pm, none);
      TORCH_CHECK_VALUE(false, "a memory capacity of ", *capacity,
                        " per stage is too small: the best split of ", n,
                        " layers into ", partitions, " stages needs ", need,
                        ", ", need - *capacity, " more");
    }
    for (int64_t i = 0, j = 0; i <= n; ++i) {
      j = std::max(j, i);
      while (j < n && pm[j + 1] - pm[i] <= cap_tol) {
        ++j;
      }
      limit[i] = j;
    }
  }
  if (partitions == 1) {
    return {n};
  }

  const double bottleneck = min_feasible_bound(partitions, p, limit);
  const double bound = bottleneck + p.back() * rel;

  // lo[j]: the first layer a stage ending at j may start at.
  std::vector<int64_t> lo(n + 1, 0);
  for (int64_t j = 1, i = 0; j <= n; ++j) {
    while (p[j] - p[i] > bound || (capacity && pm[j] - pm[i] > cap_tol)) {
      ++i;
    }
    TORCH_INTERNAL_ASSERT(i < j, "layer ", j - 1, " exceeds the bound");
    lo[j] = i;
  }
  const double tie = 4.0 * p.back() * p.back() * rel;
  auto sizes = VarianceDP(partitions, p, lo, tie).solve();
  return sizes;
}

} // namespace pipegear
