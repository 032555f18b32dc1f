// init_process_group_from_env: a c10d ProcessGroup from torchrun's
// environment, for programs without Python.
//
// torch's header for the Gloo backend (ProcessGroupGloo.hpp) includes gloo's
// own headers, which neither the pip wheels nor the libtorch archives ship.
// When they are there we use torch's header. Otherwise this file declares the
// two entry points it calls, exactly as libtorch exports them (the class
// name, its base, the constructor and Options::create_default), and nothing
// else of the class: every other member, the layout included, stays
// libtorch's. The declaration reserves more room than the real object needs
// (the real one is a few hundred bytes), because `new` uses the size this
// declaration gives. The group is then only used through c10d::ProcessGroup.
#include <pipegear/distributed/pipeline.h>

#include <cstddef>
#include <cstdlib>
#include <string>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#if defined(USE_C10D_GLOO) && __has_include(<gloo/algorithm.h>)
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#elif defined(USE_C10D_GLOO)
namespace c10d {
class TORCH_API ProcessGroupGloo : public Backend {
 public:
  struct TORCH_API Options : public Backend::Options {
    static c10::intrusive_ptr<Options> create_default(
        std::chrono::milliseconds timeout);
  };
  explicit ProcessGroupGloo(const c10::intrusive_ptr<Store>& store, int rank,
                            int size, c10::intrusive_ptr<Options> options);
  ~ProcessGroupGloo() override;

 private:
  alignas(std::max_align_t) unsigned char members_[4096];  // libtorch's
};
} // namespace c10d
#endif

#if defined(USE_C10D_NCCL) && __has_include(<nccl.h>)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#define PIPEGEAR_HAS_NCCL_GROUP 1
#endif

namespace pipegear {

namespace {

struct Env {
  int64_t rank;
  int64_t world;
  c10::intrusive_ptr<c10d::Store> tcp;
};

// torchrun's environment and the TCPStore served by rank 0.
Env from_env(const std::string& backend, std::chrono::milliseconds timeout) {
  auto env = [](const char* name) -> std::string {
    const char* v = std::getenv(name);
    TORCH_CHECK_VALUE(v != nullptr && *v != '\0', "init_process_group_from_env "
                      "needs the environment variable ", name, " (torchrun "
                      "sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)");
    return v;
  };
  auto number = [&](const char* name) {
    const std::string v = env(name);
    char* end = nullptr;
    const long long n = std::strtoll(v.c_str(), &end, 10);
    TORCH_CHECK_VALUE(end != v.c_str() && *end == '\0' && n >= 0, name,
                      " must be a non-negative integer, got '", v, "'");
    return static_cast<int64_t>(n);
  };
  TORCH_CHECK_VALUE(backend == "gloo" || backend == "nccl",
                    "backend must be 'gloo' or 'nccl', got '", backend, "'");
  TORCH_CHECK_VALUE(timeout.count() > 0, "timeout must be positive");
  const int64_t rank = number("RANK");
  const int64_t world = number("WORLD_SIZE");
  const std::string host = env("MASTER_ADDR");
  const int64_t port = number("MASTER_PORT");
  TORCH_CHECK_VALUE(world >= 1 && rank < world, "RANK (", rank,
                    ") must be below WORLD_SIZE (", world, ")");
  TORCH_CHECK_VALUE(port > 0 && port < 65536, "MASTER_PORT must be a TCP "
                    "port, got ", port);

  c10d::TCPStoreOptions opts;
  opts.port = static_cast<std::uint16_t>(port);
  opts.isServer = rank == 0;
  opts.numWorkers = static_cast<size_t>(world);
  opts.waitWorkers = true;
  opts.timeout = timeout;
  return {rank, world, c10::make_intrusive<c10d::TCPStore>(host, opts)};
}

// A group of `size` ranks over `store` (a prefix of its own).
c10::intrusive_ptr<c10d::ProcessGroup> make_group(
    const c10::intrusive_ptr<c10d::Store>& store, int64_t rank, int64_t size,
    const std::string& backend, std::chrono::milliseconds timeout) {
  auto group = c10::make_intrusive<c10d::ProcessGroup>(
      store, static_cast<int>(rank), static_cast<int>(size));
  if (backend == "gloo") {
#ifdef USE_C10D_GLOO
    // Devices as torch.distributed picks them: GLOO_SOCKET_IFNAME, else the
    // address of this host's name, else loopback.
    auto options = c10d::ProcessGroupGloo::Options::create_default(timeout);
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
        store, static_cast<int>(rank), static_cast<int>(size), options);
    auto as_backend = c10::static_intrusive_pointer_cast<c10d::Backend>(gloo);
    group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
    group->setBackend(c10::DeviceType::CPU,
                      c10d::ProcessGroup::BackendType::GLOO, as_backend);
    group->setBackend(c10::DeviceType::CUDA,
                      c10d::ProcessGroup::BackendType::GLOO, as_backend);
    return group;
#else
    TORCH_CHECK_VALUE(false, "this build of torch has no Gloo backend");
#endif
  }
#ifdef PIPEGEAR_HAS_NCCL_GROUP
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(
      store, static_cast<int>(rank), static_cast<int>(size), options);
  group->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
  group->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL,
                    c10::static_intrusive_pointer_cast<c10d::Backend>(nccl));
  return group;
#else
  TORCH_CHECK_VALUE(false, "init_process_group_from_env('nccl') needs torch "
                    "built with NCCL and nccl.h on the include path; create "
                    "the group with torch.distributed in Python instead, or "
                    "use 'gloo'");
#endif
}

} // namespace

c10::intrusive_ptr<c10d::ProcessGroup> init_process_group_from_env(
    const std::string& backend, std::chrono::milliseconds timeout) {
  const auto env = from_env(backend, timeout);
  auto store = c10::make_intrusive<c10d::PrefixStore>("pipegear/", env.tcp);
  return make_group(store, env.rank, env.world, backend, timeout);
}

MeshGroups init_mesh_from_env(int64_t stages, const std::string& backend,
                              std::chrono::milliseconds timeout) {
  const auto env = from_env(backend, timeout);
  TORCH_CHECK_VALUE(stages >= 1 && env.world % stages == 0, "init_mesh_from_env: ",
                    env.world, " ranks (WORLD_SIZE) do not make replicas of ",
                    stages, " stages");
  MeshGroups m;
  m.replicas = env.world / stages;
  m.replica = env.rank / stages;
  m.stage = env.rank % stages;
  // Each rank makes only its two groups, each over a prefix of its own.
  m.pp = make_group(c10::make_intrusive<c10d::PrefixStore>(
                        "pipegear/pp/" + std::to_string(m.replica) + "/", env.tcp),
                    m.stage, stages, backend, timeout);
  m.dp = make_group(c10::make_intrusive<c10d::PrefixStore>(
                        "pipegear/dp/" + std::to_string(m.stage) + "/", env.tcp),
                    m.replica, m.replicas, backend, timeout);
  return m;
}

} // namespace pipegear
