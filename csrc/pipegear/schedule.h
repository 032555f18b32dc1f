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
  /// Interleaved schedules: which of its worker's virtual stages the cell
  /// belongs to. Row d of a schedule over K workers runs stages d, d + K,
  /// d + 2K, ...: the cell's stage is chunk * K + d. 0 elsewhere (a row is
  /// then a stage).
  int64_t chunk = 0;
  // Written out: a defaulted operator== is C++20, and the public headers
  // compile as C++17 (what the exported target requires of a consumer).
  bool operator==(const Cell& other) const {
    return micro_batch == other.micro_batch && phase == other.phase &&
        chunk == other.chunk;
  }
  bool operator!=(const Cell& other) const { return !(*this == other); }
};

/// A schedule is data: for each stage (for each worker, when interleaved:
/// see Cell::chunk), the cells it runs, in order. The
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

/// Interleaved 1F1B (Narayanan et al., SC 2021, "Efficient large-scale
/// language model training on GPU clusters", section 2.2): the model is cut
/// into K * v stages and worker d runs stages d, d + K, ..., d + (v-1)K
/// (Cell::chunk names which), so that a micro-batch visits every worker v
/// times and the fill and drain shrink to about 1/v of 1F1B's. Forwards
/// run in groups of K micro-batches, chunk after chunk; worker d warms up
/// with 2(K-d-1) + (v-1)K forwards, then alternates one forward and one
/// backward. The published order assumes M divisible by K; for other M an
/// order that would deadlock gets longer warm-ups (one forward more per
/// worker at a time, valid at the latest when every forward runs first). K=2, v=2,
/// M=4 (F0.1: forward of micro-batch 0 on the worker's stage of chunk 1):
///
///    clock    0    1    2    3    4    5    6    7    8    9   10   11 ...
///   stage0 F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 ...
///   stage1      F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 ...
///
/// (render_schedule draws the exact table). Step style only.
Schedule interleaved_schedule(int64_t workers, int64_t virtual_stages,
                              int64_t micro_batches);

/// Interleaved zero-bubble: interleaved 1F1B with each backward split into
/// B and W, the W cells put where a worker would wait. Each worker runs its
/// forwards and Bs in interleaved 1F1B's order; where its W cells go comes
/// from a replay of that order with unit-time cells: at each clock a worker
/// runs its next forward or B if the inputs are ready, else the oldest W it
/// owes, else waits. A forward also yields to the oldest W while its worker
/// holds P micro-batches (forwards whose W has not run), P being
/// interleaved 1F1B's largest peak (worker 0's: min(2(K-1) + (v-1)K + 1,
/// vM) for M a multiple of K, v > 1). So every worker holds at most P,
/// interleaved 1F1B's memory, as ZB-H1 holds 1F1B's (its later workers
/// rising to worker 0's peak). With F = B = W = 1 clock (a chunk's cell)
/// and M a multiple of K, the step takes 3vM + K - 1 clocks, the lower
/// bound (the last worker waits K - 1 clocks for its first forward, then
/// never), against 3vM + 3(K-1) for interleaved 1F1B with its unsplit
/// backward taking 2: the bubble left is (K-1)/v of a stage's forward,
/// ZB-H1's divided by v. For other M it is shorter than interleaved
/// 1F1B's too (tests/cpp/schedule_test.cpp checks K <= 8, v <= 4,
/// M <= 40). v = 1 is a split 1F1B with ZB-H1's memory and span. K=2,
/// v=2, M=4:
///
///    clock    0    1    2    3    4    5    6    7    8    9   10   11
///   stage0 F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 W0.1 F3.0 B1.1 W1.1 F2.1 B0.0
///   stage1      F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 W0.1 F3.0 B1.0
///
///    clock   12   13   14   15   16   17   18   19   20   21   22   23   24
///   stage0 W0.0 F3.1 B1.0 B2.1 W1.0 W2.1 B3.1 B2.0 B3.0 W3.1 W2.0 W3.0
///   stage1 W1.1 F2.1 B2.1 W0.0 F3.1 B3.1 B2.0 B3.0 W1.0 W2.1 W3.1 W2.0 W3.0
///
/// (render_schedule draws the exact table). Step style only.
Schedule interleaved_zb_schedule(int64_t workers, int64_t virtual_stages,
                                 int64_t micro_batches);

/// The schedule generators a pipeline can run.
enum class ScheduleKind : uint8_t {
  kGPipe,
  k1F1B,
  kZBH1,
  kZBH2,
  kInterleaved,
  kInterleavedZB
};

/// "gpipe", "1f1b", "zb-h1", "zb-h2", "interleaved" or "interleaved-zb";
/// ValueError otherwise.
ScheduleKind parse_schedule_kind(const std::string& name);

/// Whether `kind` runs several stages per worker (takes virtual_stages
/// above 1): kInterleaved and kInterleavedZB.
inline bool takes_virtual_stages(ScheduleKind kind) {
  return kind == ScheduleKind::kInterleaved ||
      kind == ScheduleKind::kInterleavedZB;
}

/// The schedule of `kind` for `stages` stages (workers, when interleaved)
/// and `micro_batches`; `virtual_stages` stages per worker, which only the
/// kinds that take_virtual_stages take above 1 (ValueError otherwise).
Schedule make_schedule(ScheduleKind kind, int64_t stages,
                       int64_t micro_batches, int64_t virtual_stages = 1);

/// The virtual stages per worker of `schedule`: 1 + its largest Cell::chunk.
int64_t virtual_stages_of(const Schedule& schedule);

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

/// Micro-batches alive on each stage (worker, when interleaved: summed
/// over its stages) at its peak (forwards run whose
/// backward, or W when split, has not run yet), in schedule order: what
/// each stage holds in activations, in micro-batches.
std::vector<int64_t> peak_activations(const Schedule& schedule);

/// The ASCII clock table shown above, one row per stage (per worker when
/// interleaved, a cell then naming its chunk after a dot): F forward, B
/// backward (input gradient only when the same micro-batch has a W), W the
/// weight-gradient backward.
std::string render_schedule(const Schedule& schedule, int64_t micro_batches);

} // namespace pipegear
