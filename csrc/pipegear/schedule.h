#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pipegear {

/// The kinds of work a stage does for a micro-batch. A backward is either
/// one cell (kBackward: input and weight gradients together) or split in
/// two (zero-bubble schedules, Qi et al., ICLR 2024):
///   kBackwardInput  ("B") the gradient of the stage input only, which the
///                   previous stage waits for; keeps what the weights need;
///   kBackwardWeight ("W") the gradients of the stage's parameters, from
///                   what its B kept; nothing waits for it.
enum class Phase : uint8_t {
  kForward,
  kBackward,
  kBackwardInput,
  kBackwardWeight
};

/// "forward", "backward", "backward_input" or "backward_weight".
const char* phase_name(Phase phase);

/// Whether a cell of `phase` receives the gradients of the stage's outputs
/// from the next stage and sends its input gradients to the previous one
/// (kBackward and kBackwardInput; W cells exchange nothing).
inline bool carries_gradient(Phase phase) {
  return phase == Phase::kBackward || phase == Phase::kBackwardInput;
}

/// One unit of work of a stage: a forward, backward, B or W of a micro-batch.
struct Cell {
  int64_t micro_batch;
  Phase phase;
  // Written out: a defaulted operator== is C++20, and the public headers
  // compile as C++17 (what the exported target requires of a consumer).
  bool operator==(const Cell& other) const {
    return micro_batch == other.micro_batch && phase == other.phase;
  }
  bool operator!=(const Cell& other) const { return !(*this == other); }
};

/// A schedule is data: for each stage, the cells it runs, in order. The
/// engine only executes it. A valid schedule for K stages and M micro-batches
/// holds, for every (stage, micro-batch), one forward and either one
/// kBackward or one kBackwardInput and one kBackwardWeight; each stage runs
/// a micro-batch's forward before its backward (or B), its B before its W;
/// and running every stage's list in order cannot deadlock given the data
/// dependencies (B here is kBackward or kBackwardInput)
///   F(s, j) <- F(s-1, j)        B(s, j) <- B(s+1, j), F(K-1, j) for s = K-1
///   W(s, j) <- B(s, j).
using Schedule = std::vector<std::vector<Cell>>;

/// GPipe (arXiv 1811.06965, figure 2): every stage runs all forwards in
/// micro-batch order (fill), then all backwards in reverse order (drain).
/// K=3, M=4 (F = forward, B = backward, digits = micro-batch):
///
///    clock  0  1  2  3  4  5  6  7  8  9 10 11
///   stage0 F0 F1 F2 F3             B3 B2 B1 B0
///   stage1    F0 F1 F2 F3       B3 B2 B1 B0
///   stage2       F0 F1 F2 F3 B3 B2 B1 B0
///
/// (render_schedule draws the exact table). Throws ValueError for
/// stages < 1 or micro_batches < 1.
Schedule gpipe_schedule(int64_t stages, int64_t micro_batches);

/// 1F1B (PipeDream-flush): after a warm-up of K-1-s forwards, stage s
/// alternates one forward and one backward; at most K-s activations are
/// alive per stage instead of M. Step style only (module style needs every
/// forward before any backward).
Schedule one_f_one_b_schedule(int64_t stages, int64_t micro_batches);

/// ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): 1F1B
/// with split backwards. Stage s runs min(K-s, M) forwards, then for each
/// micro-batch i its B, the W of micro-batch i-s once i >= s, and the next
/// forward; the W cells left over fill the drain. At most K micro-batches
/// are alive per stage (a forward whose W has not run), 1F1B's peak; with
/// F = B = W in time, M >= K, the step takes 3M + K - 1 units against
/// 1F1B's 3M + 3(K-1) (its unsplit backward being B + W). K=3, M=4:
///
///    clock  0  1  2  3  4  5  6  7  8  9 10 11 12 13
///   stage0 F0 F1 F2       B0 W0 F3 B1 W1 B2 W2 B3 W3
///   stage1    F0 F1    B0 F2 B1 W0 F3 B2 W1 B3 W2 W3
///   stage2       F0 B0 F1 B1 F2 B2 W0 F3 B3 W1 W2 W3
///
/// (render_schedule draws the exact table). Step style only.
Schedule zb_h1_schedule(int64_t stages, int64_t micro_batches);

/// ZB-H2: ZB-H1 with a longer warm-up, min(2(K-s)-1, M) forwards at stage
/// s, so that the first stages never wait for their first B: up to 2K-1
/// micro-batches alive on stage 0, and with M >= 2K the step reaches its
/// lower bound M(F+B+W) + (K-1)F whatever the times of B and W. Step style
/// only.
Schedule zb_h2_schedule(int64_t stages, int64_t micro_batches);

/// The schedule generators a pipeline can run.
enum class ScheduleKind : uint8_t { kGPipe, k1F1B, kZBH1, kZBH2 };

/// "gpipe", "1f1b", "zb-h1" or "zb-h2"; ValueError otherwise.
ScheduleKind parse_schedule_kind(const std::string& name);

/// The schedule of `kind` for `stages` stages and `micro_batches`.
Schedule make_schedule(ScheduleKind kind, int64_t stages,
                       int64_t micro_batches);

/// True when every stage runs all its forwards before its first backward,
/// so the schedule splits into a fill pass and a drain pass (module style).
bool is_fill_drain(const Schedule& schedule);

/// The clock of every cell when each takes one unit of time and starts as
/// soon as its stage is free and its inputs are ready; same shape as the
/// schedule. Throws ValueError, naming the first offending cell, if the
/// schedule is invalid for `micro_batches` (missing or repeated cell, a
/// backward both whole and split, backward before forward, W before B,
/// deadlock).
std::vector<std::vector<int64_t>> schedule_clocks(const Schedule& schedule,
                                                  int64_t micro_batches);

/// Checks `schedule` for K = schedule.size() stages and `micro_batches`;
/// throws ValueError as schedule_clocks does.
void validate_schedule(const Schedule& schedule, int64_t micro_batches);

/// Micro-batches alive on each stage at its peak (forwards run whose
/// backward, or W when split, has not run yet), in schedule order: what
/// each stage holds in activations, in micro-batches.
std::vector<int64_t> peak_activations(const Schedule& schedule);

/// The ASCII clock table shown above, one row per stage: F forward, B
/// backward (input gradient only when the same micro-batch has a W), W the
/// weight-gradient backward.
std::string render_schedule(const Schedule& schedule, int64_t micro_batches);

} // namespace pipegear
