// Daemon: volumes registered at run time (`cairn register` and
// `unregister`), recorded in the registry of their [source] pool and
// started again from it when cairnd starts; a registration may name a
// consistency group (daemon_group.cc).
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>
#include <optional>

#include "engine/daemon/daemon.h"
#include "engine/daemon/registry.h"

namespace cairn {

StatusOr<std::shared_ptr<SourceReplicator>> Daemon::StartSource(const VolumeConfig& v) {
  ASSIGN_OR_RETURN(auto src, MakeSource(v));
  src->Start();
  spdlog::info("volume {}: replicating {}/{} to {}:{} as {}/{} every {} ms", v.id, v.pool, v.image,
               v.peer_host, v.peer_port, v.target_pool, v.target_image, v.interval.count());
  return src;
}

StatusOr<std::shared_ptr<SourceReplicator>> Daemon::MakeSource(const VolumeConfig& v) {
  ASSIGN_OR_RETURN(auto pool, OpenPool(v.pool));
  const LinkOptions lo = LinkTo(v, std::chrono::seconds(120));
  auto src = std::make_shared<SourceReplicator>(
      v, config_.site, pool, [v, lo]() { return ConnectTcp(v.peer_host, v.peer_port, lo); });
  src->set_memory_budget(budget_);
  src->set_base_point([this, v]() { return BasePointOf(v); });
  if (config_.sink && std::find(config_.sink->pools.begin(), config_.sink->pools.end(), v.pool) !=
                          config_.sink->pools.end()) {
    // Only a sink of this site can write the image (failed over elsewhere).
    src->set_stand_down([this, v]() { return StandDownReason(v); });
  }
  return src;
}

VolumeConfig Daemon::RegisteredVolume(const Registration& r) const {
  const auto& src = *config_.source;
  VolumeConfig v;
  v.id = r.volume;
  v.pool = r.pool;
  v.image = r.image;
  v.peer_host = src.peer_host;
  v.peer_port = src.peer_port;
  v.peer_name = src.peer_name;
  v.target_pool = r.target_pool.empty() ? r.pool : r.target_pool;
  v.target_image = r.target_image.empty() ? r.image + ".standby" : r.target_image;
  v.interval = src.interval;
  v.keep_snapshots = src.keep_snapshots;
  v.snapshot_tiers = src.snapshot_tiers;
  v.outage_snapshots = src.outage_snapshots;
  v.group = r.group;
  v.retention = r.retention ? r.retention : src.retention;
  return v;
}

Status Daemon::StartRegistered() {
  if (!config_.source) return OkStatus();
  std::map<std::string, std::vector<VolumeConfig>> groups;
  for (const auto& pool : config_.source->pools) {
    auto kv = cluster_->OpenKvStore(pool, kRegistryObject);
    if (!kv.ok()) return kv.status().Annotate("[source] pools: " + pool);
    auto entries = (*kv)->Scan("volume/");
    if (!entries.ok()) return entries.status().Annotate("reading the registry in pool " + pool);
    for (const auto& [key, text] : *entries) {
      auto r = DecodeRegistration(key, text);
      if (!r.ok()) {
        spdlog::error("pool {}: skipping a registration: {}", pool, r.status().ToString());
        continue;
      }
      if (!r->group.empty()) {
        groups[r->group].push_back(RegisteredVolume(*r));
        std::lock_guard lock(sources_mu_);
        registered_[r->volume] = *r;
        continue;
      }
      auto src = StartSource(RegisteredVolume(*r));
      if (!src.ok()) {
        spdlog::error("volume {}: registered but cannot start: {}", r->volume,
                      src.status().ToString());
        continue;
      }
      std::lock_guard lock(sources_mu_);
      sources_.push_back(std::move(src).value());
      registered_[r->volume] = *r;
    }
  }
  for (const auto& [name, members] : groups) {
    if (Status st = StartGroup(name, members); !st.ok()) {
      spdlog::error("group {}: registered but cannot start: {}", name, st.ToString());
    }
  }
  return OkStatus();
}

Status Daemon::CheckGroupRegistration(const Registration& r, Pool& pool) {
  if (r.group.empty()) return OkStatus();
  RETURN_IF_ERROR(ValidateVolumeId(r.group).Annotate("group name"));
  for (const auto& v : config_.volumes) {
    if (v.group == r.group) {
      return FailedPrecondition(fmt::format(
          "group '{}' is defined in this cairnd's config file: add members there", r.group));
    }
  }
  auto images = pool.GroupImages(r.group);
  if (!images.ok()) {
    return images.status().Annotate(
        fmt::format("volume {} in group {}: create it first (`rbd group create {}/{}`)", r.volume,
                    r.group, r.pool, r.group));
  }
  if (std::find(images->begin(), images->end(), r.image) == images->end()) {
    return FailedPrecondition(fmt::format(
        "image {}/{} is not in RBD group {}/{}: add it first (`rbd group image add {}/{} {}/{}`)",
        r.pool, r.image, r.pool, r.group, r.pool, r.group, r.pool, r.image));
  }
  std::lock_guard lock(sources_mu_);
  for (const auto& [volume, other] : registered_) {
    if (volume == r.volume || other.group != r.group) continue;
    if (other.pool != r.pool || other.target_pool != r.target_pool) {
      return InvalidArgument(fmt::format(
          "group '{}' replicates pool {} to pool {} (volume {}): its members share both", r.group,
          other.pool, other.target_pool, volume));
    }
    const auto theirs = RegisteredVolume(other).retention, mine = RegisteredVolume(r).retention;
    if (theirs != mine) {
      const auto describe = [](const std::optional<RetentionRules>& rules) {
        return rules ? DescribeRetention(*rules) : std::string("the sink's rules");
      };
      return InvalidArgument(fmt::format(
          "group '{}' keeps {} (volume {}), this volume {}: a group keeps whole instants, so its "
          "members share their retention",
          r.group, describe(theirs), volume, describe(mine)));
    }
  }
  return OkStatus();
}

void Daemon::StopSource(const std::string& volume) {
  std::shared_ptr<SourceReplicator> stopped;
  {
    std::lock_guard lock(sources_mu_);
    for (auto s = sources_.begin(); s != sources_.end(); ++s) {
      if ((*s)->config().id == volume) {
        stopped = std::move(*s);
        sources_.erase(s);
        break;
      }
    }
  }
  if (stopped) stopped->Stop();
}

StatusOr<VolumeStatusInfo> Daemon::Register(const Registration& req) {
  if (!config_.source) {
    return FailedPrecondition(
        "this cairnd takes no registrations: add a [source] section (pools, peer) to its config");
  }
  RETURN_IF_ERROR(ValidateVolumeId(req.volume));
  if (req.image.empty()) return InvalidArgument("register: no image");
  const auto& pools = config_.source->pools;
  if (std::find(pools.begin(), pools.end(), req.pool) == pools.end()) {
    return FailedPrecondition(
        fmt::format("pool '{}' is not one of this cairnd's [source] pools ({}): add it there",
                    req.pool, fmt::join(pools, ", ")));
  }
  Registration r = req;
  const VolumeConfig v = RegisteredVolume(r);
  r.target_pool = v.target_pool;
  r.target_image = v.target_image;
  ASSIGN_OR_RETURN(auto pool, OpenPool(r.pool));
  ASSIGN_OR_RETURN(bool exists, pool->Exists(r.image));
  if (!exists) {
    return NotFound(
        fmt::format("image {}/{} does not exist at site {}", r.pool, r.image, config_.site));
  }
  std::lock_guard registering(register_mu_);
  bool known = false;
  std::optional<Registration> moved_from;  // registered already, in another group (or none)
  {
    std::lock_guard lock(sources_mu_);
    if (auto it = registered_.find(r.volume); it != registered_.end()) {
      if (!SameRegistration(it->second, r)) {
        return AlreadyExists(fmt::format(
            "volume '{}' is registered already, for {}/{} -> {}/{}: unregister it first", r.volume,
            it->second.pool, it->second.image, it->second.target_pool, it->second.target_image));
      }
      known = it->second.group == r.group && it->second.retention == r.retention;
      if (!known) moved_from = it->second;
    } else {
      for (const auto& s : sources_) {
        const auto& c = s->config();
        if (c.id == r.volume) {
          return AlreadyExists(
              fmt::format("volume '{}' is defined in this cairnd's config file", r.volume));
        }
        if (c.pool == r.pool && c.image == r.image) {
          return AlreadyExists(fmt::format("image {}/{} is replicated already, as volume '{}'",
                                           r.pool, r.image, c.id));
        }
      }
    }
  }
  if (!known) {
    RETURN_IF_ERROR(CheckGroupRegistration(r, *pool));
    ASSIGN_OR_RETURN(auto kv, cluster_->OpenKvStore(r.pool, kRegistryObject));
    RETURN_IF_ERROR(kv->Commit({{"volume/" + r.volume, EncodeRegistration(r)}}, {}));
    {
      std::lock_guard lock(sources_mu_);
      registered_[r.volume] = r;
    }
    // A move: the volume leaves its own schedule or its old group (which
    // goes on without it), then joins the new one, from its point.
    if (moved_from && moved_from->group.empty()) StopSource(r.volume);
    if (moved_from && !moved_from->group.empty() && moved_from->group != r.group) {
      RETURN_IF_ERROR(RestartRegisteredGroup(moved_from->group));
    }
    if (r.group.empty()) {
      ASSIGN_OR_RETURN(auto src, StartSource(v));
      std::lock_guard lock(sources_mu_);
      sources_.push_back(std::move(src));
    } else {
      RETURN_IF_ERROR(RestartRegisteredGroup(r.group));
    }
    spdlog::info("volume {}: registered ({}/{}{})", r.volume, r.pool, r.image,
                 r.group.empty() ? "" : ", a member of group " + r.group);
  }
  if (auto s = FindSource(r.volume)) return s->Report();
  return Internal("registered volume vanished");
}

Status Daemon::Unregister(const std::string& volume, bool remove_snapshots) {
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  std::lock_guard registering(register_mu_);
  Registration r;
  {
    std::lock_guard lock(sources_mu_);
    auto it = registered_.find(volume);
    if (it == registered_.end()) {
      for (const auto& s : sources_) {
        if (s->config().id == volume) {
          return FailedPrecondition(fmt::format(
              "volume '{}' is defined in this cairnd's config file: remove its [volume] section",
              volume));
        }
      }
      return NotFound(fmt::format("volume '{}' is not registered at this cairnd", volume));
    }
    r = it->second;
  }
  ASSIGN_OR_RETURN(auto kv, cluster_->OpenKvStore(r.pool, kRegistryObject));
  RETURN_IF_ERROR(kv->Commit({}, {"volume/" + volume}));
  {
    std::lock_guard lock(sources_mu_);
    registered_.erase(volume);
  }
  if (r.group.empty()) {
    StopSource(volume);
  } else {
    // The group goes on without it (the RBD group should lose it too:
    // until then the group takes no instant, and its status says why).
    RETURN_IF_ERROR(RestartRegisteredGroup(r.group));
  }
  if (remove_snapshots) {
    ASSIGN_OR_RETURN(auto pool, OpenPool(r.pool));
    auto vol = pool->Open(r.image);
    if (!vol.ok()) {
      if (vol.status().code() == Code::kNotFound) return OkStatus();  // the image went first
      return vol.status();
    }
    ASSIGN_OR_RETURN(auto snaps, (*vol)->ListSnaps());
    for (const auto& s : snaps) {
      if (ParseSnapName(s.name)) RETURN_IF_ERROR((*vol)->RemoveSnap(s.name));
    }
  }
  spdlog::info("volume {}: unregistered ({}/{}){}", volume, r.pool, r.image,
               remove_snapshots ? ", its cairn snapshots removed" : "");
  return OkStatus();
}

}  // namespace cairn
