// Sink: consistency groups at the standby site. A group point is recorded
// by the catalog once every member's point of one instant is made
// (Catalog::AddPoint); here it is found, and restored, drilled or promoted
// whole: every member at the same point, or none.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <set>

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

StatusOr<GroupPoint> Sink::OnWholeGroup(const std::string& group, uint64_t seq,
                                        std::string_view what,
                                        const std::function<Status(const RestorePoint&)>& act,
                                        const std::function<void(const RestorePoint&)>& undo) {
  ASSIGN_OR_RETURN(const auto points, GroupPoints(group));
  auto gp = seq == 0 ? std::prev(points.end())
                     : std::find_if(points.begin(), points.end(),
                                    [&](const GroupPoint& g) { return g.seq == seq; });
  if (gp == points.end()) {
    return NotFound(fmt::format("group '{}' has no restore point {} (it has {}..{})", group, seq,
                                points.front().seq, points.back().seq));
  }
  std::vector<RestorePoint> done;
  Status failed;
  for (const auto& volume : gp->volumes) {
    StatusOr<std::string> pool = FindVolumePool(volume);
    StatusOr<std::shared_ptr<KvStore>> kv = pool.ok() ? env_.open_catalog(*pool) : pool.status();
    StatusOr<RestorePoint> point = kv.ok() ? Catalog(**kv).Get(volume, gp->seq) : kv.status();
    failed = point.ok() ? act(*point) : point.status();
    if (!failed.ok()) {
      failed = failed.Annotate(fmt::format("member {}", volume));
      break;
    }
    done.push_back(std::move(point).value());
  }
  if (failed.ok()) {
    spdlog::info("group {}: {} of group point {}: {} volumes", group, what, gp->seq, done.size());
    return *gp;
  }
  // All or nothing: a group in part is no instant of it.
  for (auto it = done.rbegin(); it != done.rend(); ++it) undo(*it);
  return failed.Annotate(fmt::format("group {}: {} of group point {} (undone for every member)",
                                     group, what, gp->seq));
}

StatusOr<std::vector<RestoreResult>> Sink::RestoreGroup(const std::string& group, uint64_t seq,
                                                        const std::string& suffix, bool full,
                                                        bool force) {
  std::vector<RestoreResult> out;
  const auto act = [&](const RestorePoint& p) -> Status {
    const std::string tail = suffix.empty() ? fmt::format("restore-{}", p.epoch.seq) : suffix;
    ASSIGN_OR_RETURN(RestoreResult r,
                     Restore(p.epoch.volume, p.epoch.seq, fmt::format("{}-{}", p.image, tail), full,
                             nullptr, force));
    out.push_back(std::move(r));
    return OkStatus();
  };
  const auto undo = [&](const RestorePoint& p) {
    auto it = std::find_if(out.begin(), out.end(), [&](const RestoreResult& r) {
      return r.point.epoch.volume == p.epoch.volume;
    });
    if (it == out.end()) return;
    auto pool = env_.open_pool(it->pool);
    Status st = pool.ok() ? (*pool)->Remove(it->image) : pool.status();
    if (!st.ok()) {
      spdlog::warn("group {}: removing {}/{} of the failed restore: {}", group, it->pool, it->image,
                   st.ToString());
    }
  };
  RETURN_IF_ERROR(OnWholeGroup(group, seq, "restore", act, undo).status());
  return out;
}

StatusOr<std::vector<DrillResult>> Sink::DrillGroup(const std::string& group, uint64_t seq) {
  std::vector<DrillResult> out;
  const auto act = [&](const RestorePoint& p) -> Status {
    ASSIGN_OR_RETURN(DrillResult r, DrillStart(p.epoch.volume, p.epoch.seq, ""));
    out.push_back(std::move(r));
    return OkStatus();
  };
  const auto undo = [&](const RestorePoint& p) {
    for (const auto& r : out) {
      if (r.point.epoch.volume != p.epoch.volume) continue;
      if (auto st = DrillStop(p.epoch.volume, r.image); !st.ok()) {
        spdlog::warn("group {}: stopping drill {} of the failed group drill: {}", group, r.image,
                     st.status().ToString());
      }
    }
  };
  RETURN_IF_ERROR(OnWholeGroup(group, seq, "drill", act, undo).status());
  return out;
}

StatusOr<std::vector<std::string>> Sink::StopGroupDrills(const std::string& group) {
  ASSIGN_OR_RETURN(const auto points, GroupPoints(group));
  std::set<std::string> members;
  for (const auto& g : points) members.insert(g.volumes.begin(), g.volumes.end());
  std::vector<std::string> removed;
  for (const auto& volume : members) {
    auto r = DrillStop(volume, "");
    if (!r.ok() && r.status().code() == Code::kNotFound) continue;  // no drill of it
    if (!r.ok()) return r.status().Annotate(fmt::format("group {}: member {}", group, volume));
    removed.insert(removed.end(), r->begin(), r->end());
  }
  if (removed.empty()) return NotFound(fmt::format("group '{}' has no drill running", group));
  return removed;
}

StatusOr<std::vector<PromoteResult>> Sink::PromoteGroup(const std::string& group, uint64_t seq,
                                                        const std::string& suffix) {
  std::vector<PromoteResult> out;
  const std::string tail = suffix.empty() ? "failover" : suffix;
  const auto act = [&](const RestorePoint& p) -> Status {
    ASSIGN_OR_RETURN(PromoteResult r, Promote(p.epoch.volume, p.epoch.seq, p.pool,
                                              fmt::format("{}-{}", p.image, tail)));
    out.push_back(std::move(r));
    return OkStatus();
  };
  const auto undo = [&](const RestorePoint& p) {
    if (auto kept = Release(p.epoch.volume); !kept.ok()) {
      spdlog::error("group {}: member {} stays promoted after the group's failover failed: {}",
                    group, p.epoch.volume, kept.status().ToString());
    }
  };
  RETURN_IF_ERROR(OnWholeGroup(group, seq, "failover", act, undo).status());
  return out;
}

}  // namespace cairn
