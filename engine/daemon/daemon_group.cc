// Daemon: consistency groups. [volume] sections that name one `group` are
// its members, and so are the volumes registered with one: their
// replicators start under a GroupSource that takes their snapshots at one
// instant. A registered group starts again, with its members as they are
// now, whenever one is registered, moved or unregistered: the others go
// on from their points (no resync).
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>

#include "engine/daemon/daemon.h"

namespace cairn {

Status Daemon::StartVolumes() {
  std::map<std::string, std::vector<VolumeConfig>> groups;
  for (const auto& v : config_.volumes) {
    if (!v.group.empty()) {
      groups[v.group].push_back(v);
      continue;
    }
    ASSIGN_OR_RETURN(auto src, StartSource(v));
    std::lock_guard lock(sources_mu_);
    sources_.push_back(std::move(src));
  }
  for (const auto& [name, members] : groups) RETURN_IF_ERROR(StartGroup(name, members));
  return OkStatus();
}

Status Daemon::StartGroup(const std::string& name, const std::vector<VolumeConfig>& members) {
  ASSIGN_OR_RETURN(auto pool, OpenPool(members.front().pool));
  std::vector<std::shared_ptr<SourceReplicator>> sources;
  std::chrono::milliseconds interval{0};
  for (const auto& v : members) {
    ASSIGN_OR_RETURN(auto src, MakeSource(v));
    sources.push_back(std::move(src));
    // The group's instants come as often as its most frequent member asks.
    if (v.interval.count() > 0 && (interval.count() == 0 || v.interval < interval)) {
      interval = v.interval;
    }
  }
  auto group = std::make_shared<GroupSource>(name, pool, interval, sources);
  for (auto& src : sources) src->Start();
  group->Start();
  spdlog::info("group {}: {} volumes of RBD group {}/{} replicate at one instant every {} ms", name,
               sources.size(), members.front().pool, name, interval.count());
  std::lock_guard lock(sources_mu_);
  sources_.insert(sources_.end(), sources.begin(), sources.end());
  groups_.push_back(std::move(group));
  return OkStatus();
}

void Daemon::StopGroup(const std::string& name) {
  std::shared_ptr<GroupSource> group;
  std::vector<std::shared_ptr<SourceReplicator>> members;
  {
    std::lock_guard lock(sources_mu_);
    auto g = std::find_if(groups_.begin(), groups_.end(),
                          [&](const auto& g) { return g->name() == name; });
    if (g == groups_.end()) return;
    group = std::move(*g);
    groups_.erase(g);
    auto moved = std::stable_partition(sources_.begin(), sources_.end(),
                                       [&](const auto& s) { return s->group() != name; });
    members.assign(std::make_move_iterator(moved), std::make_move_iterator(sources_.end()));
    sources_.erase(moved, sources_.end());
  }
  group->Stop();  // no instant is taken from now on
  for (auto& s : members) s->RequestStop();
  for (auto& s : members) s->Stop();
}

Status Daemon::RestartRegisteredGroup(const std::string& name) {
  StopGroup(name);
  std::vector<VolumeConfig> members;
  {
    std::lock_guard lock(sources_mu_);
    for (const auto& [volume, r] : registered_) {
      if (r.group == name) members.push_back(RegisteredVolume(r));
    }
  }
  if (members.empty()) {
    spdlog::info("group {}: no member left; its schedule stops", name);
    return OkStatus();
  }
  return StartGroup(name, members);
}

std::shared_ptr<GroupSource> Daemon::FindGroup(const std::string& group) {
  std::lock_guard lock(sources_mu_);
  for (const auto& g : groups_) {
    if (g->name() == group) return g;
  }
  return nullptr;
}

StatusOr<std::vector<GroupStatusInfo>> Daemon::GroupStatus(const std::string& group) {
  std::vector<std::shared_ptr<GroupSource>> groups;
  {
    std::lock_guard lock(sources_mu_);
    groups = groups_;
  }
  std::vector<GroupStatusInfo> out;
  for (const auto& g : groups) {
    if (group.empty() || g->name() == group) out.push_back(g->Report());
  }
  if (!group.empty() && out.empty()) {
    return NotFound(fmt::format("no group '{}' replicates from this cairnd", group));
  }
  return out;
}

StatusOr<uint64_t> Daemon::ReplicateGroup(const std::string& group) {
  auto g = FindGroup(group);
  if (!g) return NotFound(fmt::format("no group '{}' replicates from this cairnd", group));
  return g->RequestNow();
}

StatusOr<std::vector<GroupPoint>> Daemon::GroupPoints(const std::string& group) {
  if (!sink_) return FailedPrecondition("this cairnd is no sink: group points are at the standby");
  return sink_->GroupPoints(group);
}

StatusOr<std::vector<RestoreResult>> Daemon::RestoreGroup(const std::string& group, uint64_t seq,
                                                          const std::string& suffix, bool full,
                                                          bool force) {
  if (!sink_) return FailedPrecondition("this cairnd is no sink: group points are at the standby");
  return sink_->RestoreGroup(group, seq, suffix, full, force);
}

StatusOr<ControlService::GroupImages> Daemon::DrillGroup(const std::string& group, uint64_t seq,
                                                         bool stop) {
  if (!sink_) return FailedPrecondition("this cairnd is no sink: drills run at the standby");
  GroupImages out;
  if (stop) {
    ASSIGN_OR_RETURN(out.images, sink_->StopGroupDrills(group));
    return out;
  }
  ASSIGN_OR_RETURN(const auto drills, sink_->DrillGroup(group, seq));
  for (const auto& d : drills) {
    out.seq = d.point.epoch.seq;
    out.images.push_back(d.pool + "/" + d.image);
  }
  return out;
}

StatusOr<ControlService::GroupImages> Daemon::PromoteGroup(const std::string& group, uint64_t seq,
                                                           const std::string& suffix) {
  if (!sink_) {
    return FailedPrecondition("this cairnd is not a sink: fail a group over on the standby's");
  }
  ASSIGN_OR_RETURN(const auto promoted, sink_->PromoteGroup(group, seq, suffix));
  GroupImages out;
  for (const auto& p : promoted) {
    out.seq = p.point.epoch.seq;
    out.images.push_back(p.pool + "/" + p.image);
  }
  return out;
}

}  // namespace cairn
