// Sink: consistency groups at the standby site. A group point is recorded
// by the catalog once every member's point of one instant is made
// (Catalog::AddPoint); here it is found, and restored, drilled or promoted
// whole: every member at the same point, or none; and its members keep
// the same instants against retention.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <set>

#include "engine/replication/retention.h"
#include "engine/replication/sink.h"
#include "engine/replication/sink_target.h"

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
  // Every member's point is held against retention until the last member
  // is done, and read once held: one removed before that fails the group
  // before anything is done.
  std::vector<std::unique_ptr<PointHold>> holds;
  std::vector<RestorePoint> members;
  for (const auto& volume : gp->volumes) {
    holds.push_back(std::make_unique<PointHold>(mu_, verifying_, volume, gp->seq));
    StatusOr<std::string> pool = FindVolumePool(volume);
    StatusOr<std::shared_ptr<KvStore>> kv = pool.ok() ? env_.open_catalog(*pool) : pool.status();
    StatusOr<RestorePoint> point = kv.ok() ? Catalog(**kv).Get(volume, gp->seq) : kv.status();
    if (!point.ok()) {
      return point.status().Annotate(
          fmt::format("group {}: {} of group point {}: member {}", group, what, gp->seq, volume));
    }
    members.push_back(std::move(point).value());
  }
  std::vector<RestorePoint> done;
  Status failed;
  for (const auto& point : members) {
    failed = act(point);
    if (!failed.ok()) {
      failed = failed.Annotate(fmt::format("member {}", point.epoch.volume));
      break;
    }
    done.push_back(point);
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

void Sink::KeepGroupPoints(Target& t, const std::vector<RestorePoint>& points,
                           std::set<uint64_t>* keep) {
  const std::string& group = points.back().epoch.group;
  if (group.empty()) return;
  // The newest of this member's instants that is whole: asked seq by seq,
  // newest first (usually the first or second), so a pass reads one
  // instant's member records, not every record of the group.
  uint64_t whole = 0;
  Status unknown;
  for (auto it = points.rbegin(); it != points.rend() && whole == 0 && unknown.ok(); ++it) {
    if (it->epoch.group != group) continue;
    auto gp = t.catalog->GetGroupPoint(group, it->epoch.seq);
    if (gp.ok()) {
      whole = it->epoch.seq;
    } else if (gp.status().code() != Code::kNotFound) {
      unknown = gp.status();
    }
  }
  StatusOr<std::set<uint64_t>> instants = std::set<uint64_t>{};
  if (unknown.ok() && whole != 0) instants = GroupInstantsToKeep(t, group, whole);
  if (!instants.ok()) unknown = instants.status();
  if (!unknown.ok()) {
    spdlog::warn("volume {}: retention keeps every point of group {}: {}", t.volume, group,
                 unknown.message());
  }
  for (const auto& p : points) {
    if (p.epoch.group != group) continue;
    if (!unknown.ok() || whole == 0 || p.epoch.seq >= whole || instants->count(p.epoch.seq)) {
      keep->insert(p.epoch.seq);
    } else {
      keep->erase(p.epoch.seq);
    }
  }
}

StatusOr<std::set<uint64_t>> Sink::GroupInstantsToKeep(Target& t, const std::string& group,
                                                       uint64_t whole) {
  const std::string key = t.pool_name + "/" + group;
  {
    std::lock_guard lock(mu_);
    auto it = group_keep_.find(key);
    if (it != group_keep_.end() && it->second.whole == whole && it->second.rules == *t.rules) {
      return it->second.instants;
    }
  }
  // Every member's rules run on the same list: the whole points up to
  // `whole`, each at its group point's time (the latest of its members'
  // snapshot times; a member's own can fall in another hour). Points the
  // rules drop never change what they keep, so a member that computes
  // this after another member's pass keeps the same instants.
  ASSIGN_OR_RETURN(const auto group_points, t.catalog->GroupPoints(group));
  std::vector<RestorePoint> instants;
  for (const auto& g : group_points) {
    if (g.seq > whole) break;
    RestorePoint p;
    p.epoch.seq = g.seq;
    p.epoch.snap_time_ns = g.source_time_ns;
    instants.push_back(std::move(p));
  }
  std::set<uint64_t> kept = KeptByRules(instants, *t.rules);
  std::lock_guard lock(mu_);
  group_keep_[key] = GroupKeep{whole, *t.rules, kept};
  return kept;
}

}  // namespace cairn
