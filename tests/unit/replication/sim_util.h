// What the seeded simulators share (simulation_test.cc,
// role_swap_simulation_test.cc, group_simulation_test.cc): the schedules
// to run and how a failed one is reported, faults that strike once on the
// wire or on a volume, and a torn spool file.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/link/fault_link.h"
#include "engine/replication/sink.h"
#include "engine/spool/file_spool_store.h"
#include "engine/volume/fault_pool.h"

namespace cairn::sim {

// The schedules to run: CAIRN_SIM_SEED=S alone; else the first
// CAIRN_SIM_SEEDS=N (default 200) divided by `share` (at least one), from
// CAIRN_SIM_BASE (default 1).
inline std::vector<uint64_t> Seeds(uint64_t share) {
  if (const char* one = std::getenv("CAIRN_SIM_SEED")) return {std::strtoull(one, nullptr, 10)};
  const auto env = [](const char* name, uint64_t def) {
    const char* v = std::getenv(name);
    return v ? std::strtoull(v, nullptr, 10) : def;
  };
  const uint64_t count = std::max<uint64_t>(1, env("CAIRN_SIM_SEEDS", 200) / share);
  const uint64_t base = env("CAIRN_SIM_BASE", 1);
  std::vector<uint64_t> seeds;
  for (uint64_t s = base; s < base + count; ++s) seeds.push_back(s);
  return seeds;
}

// Runs `one` (a schedule; it returns its trace of faults) for each seed,
// until one fails: that failure names its seed and how to replay it with
// the gtest `filter`.
inline void RunSeeds(const std::vector<uint64_t>& seeds, const std::string& filter,
                     const std::function<std::string(uint64_t)>& one) {
  for (uint64_t seed : seeds) {
    const std::string trace = one(seed);
    if (::testing::Test::HasFailure()) {
      ADD_FAILURE() << "seed " << seed << " failed; faults: " << trace
                    << "\nreplay with: CAIRN_SIM_SEED=" << seed
                    << " build/tests/unit_tests --gtest_filter=" << filter;
      return;
    }
  }
}

// A simulated site's sink: its spool files in `spool`, its pool (its
// standby images) and its catalog.
inline SinkEnv SinkEnvFor(std::string site, const std::filesystem::path& spool,
                          std::shared_ptr<Pool> pool, std::shared_ptr<KvStore> kv, LinkTimeouts t) {
  SinkEnv env;
  env.site = std::move(site);
  env.spools = std::make_shared<FileSpoolStore>(spool);
  env.pools = {"rbd"};
  env.open_pool = [pool](const std::string&) -> StatusOr<std::shared_ptr<Pool>> { return pool; };
  env.open_catalog = [kv](const std::string&) -> StatusOr<std::shared_ptr<KvStore>> { return kv; };
  env.apply.window = 4;
  env.spool.buffer_bytes = 64 << 10;
  env.timeouts = t;
  return env;
}

// A wire hook that applies `what` to the n-th frame it sees.
inline WireFaultFn AtFrame(int n, std::function<WireFault(std::string&)> what) {
  auto count = std::make_shared<int>(0);
  return [count, n, what = std::move(what)](std::string& bytes) {
    return (*count)++ == n ? what(bytes) : WireFault::kDeliver;
  };
}

// The n-th `op` on `pool` fails, once.
inline void FailOnce(FaultPool& pool, VolumeOp op, int n) {
  auto count = std::make_shared<std::atomic<int>>(0);
  pool.SetFault([count, op, n](const VolumeFaultPoint& p) {
    if (p.op == op && (*count)++ == n) return Unavailable("injected I/O error");
    return OkStatus();
  });
}

// Lost unsynced writes or a torn write: every spool file under `dir` is
// cut short at a random byte past its first 4 KiB.
inline void TearSpools(const std::filesystem::path& dir, std::mt19937_64& rng) {
  std::error_code ec;
  for (auto& e : std::filesystem::recursive_directory_iterator(dir, ec)) {
    if (e.path().extension() != ".spool") continue;
    const auto size = std::filesystem::file_size(e.path(), ec);
    if (size > 4096) std::filesystem::resize_file(e.path(), 4096 + rng() % (size - 4096), ec);
  }
}

// "name count, ..." for the fault kinds 1 to n-1 (0 is none).
template <class Fault>
std::string KindCounts(const uint64_t* counts, int n, const char* (*name)(Fault)) {
  std::string kinds;
  for (int k = 1; k < n; ++k) {
    kinds += std::string(k > 1 ? ", " : "") + name(static_cast<Fault>(k)) + " " +
             std::to_string(counts[k]);
  }
  return kinds;
}

}  // namespace cairn::sim
