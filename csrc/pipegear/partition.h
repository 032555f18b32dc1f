#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace pipegear {

/// Splits L consecutive layers with the given `costs` into `partitions`
/// stages and returns the number of layers of each stage (each >= 1, summing
/// to L). The split is optimal, not a heuristic:
///
///   1. it minimises the bottleneck, the largest stage cost, exactly;
///   2. among those splits it minimises the variance of the stage costs
///      (equivalently their sum of squares, the total being fixed);
///   3. then the variance of the layer counts, so that zero-cost layers
///      spread evenly;
///   4. remaining ties go to the split whose last stage is the shortest,
///      then whose second-to-last is, and so on: earlier stages carry more,
///      as chunk_sizes() gives larger micro-batches first.
///
/// Costs are compared with a relative tolerance of L * 2^-52 of their total,
/// the rounding bound of the prefix sums; within it, (2) and (3) treat values
/// as equal.
///
/// `memory` (per layer) and `capacity` (per stage) add a hard constraint:
/// every stage's memory must be at most `capacity`.
///
///   balance_by_cost(2, {1, 1, 1, 1, 1, 1, 1, 10}) == {7, 1}
///   balance_by_cost(3, {1, 1, 1, 1, 1, 1, 1, 1}) == {3, 3, 2}
///   balance_by_cost(2, {1, 2, 3, 4}, {4, 1, 1, 1}, 4.0) == {1, 3}
///
/// O(K L log L) time and O(K (L - K + 1)) memory: a bisection over doubles
/// for the bottleneck (at most 64 greedy checks of O(K log L)), then a
/// divide-and-conquer dynamic programme for the sums of squares
/// (docs/balance.md). Throws ValueError for
/// partitions < 1 or > L, no costs, a negative, NaN or infinite cost or
/// memory, `memory` of another length than `costs`, `capacity` without
/// `memory`, or a capacity that no split can meet (the message gives the
/// smallest one that could).
std::vector<int64_t> balance_by_cost(
    int64_t partitions,
    const std::vector<double>& costs,
    const std::vector<double>& memory = {},
    std::optional<double> capacity = std::nullopt);

} // namespace pipegear
