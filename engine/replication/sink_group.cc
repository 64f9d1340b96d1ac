// Sink: consistency groups at the standby site. A group point is recorded
// by the catalog once every member's point of one instant is made
// (Catalog::AddPoint); here it is found and restored whole.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "engine/replication/sink.h"

namespace cairn {

StatusOr<std::vector<GroupPoint>> Sink::GroupPoints(const std::string& group) {
  RETURN_IF_ERROR(ValidateVolumeId(group).Annotate("group name"));
  for (const auto& pool : env_.pools) {
    ASSIGN_OR_RETURN(auto kv, env_.open_catalog(pool));
    ASSIGN_OR_RETURN(auto points, Catalog(*kv).GroupPoints(group));
    if (!points.empty()) return points;
  }
  return NotFound(fmt::format("group '{}' has no restore point at this site (pools {})", group,
                              fmt::join(env_.pools, ", ")));
}

StatusOr<std::vector<RestoreResult>> Sink::RestoreGroup(const std::string& group, uint64_t seq,
                                                        const std::string& suffix, bool full,
                                                        bool force) {
  ASSIGN_OR_RETURN(const auto points, GroupPoints(group));
  const GroupPoint* gp = &points.back();
  if (seq != 0) {
    auto it = std::find_if(points.begin(), points.end(),
                           [&](const GroupPoint& g) { return g.seq == seq; });
    if (it == points.end()) {
      return NotFound(fmt::format("group '{}' has no restore point {} (it has {}..{})", group, seq,
                                  points.front().seq, points.back().seq));
    }
    gp = &*it;
  }
  const std::string tail = suffix.empty() ? fmt::format("restore-{}", gp->seq) : suffix;
  std::vector<RestoreResult> done;
  Status failed;
  for (const auto& volume : gp->volumes) {
    auto point = Points(volume);
    if (!point.ok()) {
      failed = point.status();
      break;
    }
    auto it = std::find_if(point->begin(), point->end(),
                           [&](const RestorePoint& p) { return p.epoch.seq == gp->seq; });
    if (it == point->end()) {
      failed = NotFound(fmt::format("volume {} no longer has point {}", volume, gp->seq));
      break;
    }
    auto r = Restore(volume, gp->seq, fmt::format("{}-{}", it->image, tail), full, nullptr, force);
    if (!r.ok()) {
      failed = r.status().Annotate(fmt::format("member {}", volume));
      break;
    }
    done.push_back(std::move(r).value());
  }
  if (failed.ok()) {
    spdlog::info("group {}: restore point {} restored, {} volumes ({})", group, gp->seq,
                 done.size(), full ? "full copies" : "clones");
    return done;
  }
  // All or nothing: a group restored in part is no instant of it.
  for (const auto& r : done) {
    auto pool = env_.open_pool(r.pool);
    Status st = pool.ok() ? (*pool)->Remove(r.image) : pool.status();
    if (!st.ok()) {
      spdlog::warn("group {}: removing {}/{} of the failed restore: {}", group, r.pool, r.image,
                   st.ToString());
    }
  }
  return failed.Annotate(
      fmt::format("group {}: restore point {} (nothing restored)", group, gp->seq));
}

}  // namespace cairn
