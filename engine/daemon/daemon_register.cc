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
#include <set>
#include <utility>

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
      v, config_.site, pool, [v, lo, pacer = pacer_]() -> StatusOr<std::unique_ptr<Link>> {
        ASSIGN_OR_RETURN(std::unique_ptr<Link> link, ConnectTcp(v.peer_host, v.peer_port, lo));
        if (!pacer) return link;
        return std::unique_ptr<Link>(std::make_unique<PacedLink>(std::move(link), pacer));
      });
  src->set_memory_budget(budget_);
  src->set_base_point([this, v]() { return BasePointOf(v); });
  if (config_.sink && std::find(config_.sink->pools.begin(), config_.sink->pools.end(), v.pool) !=
                          config_.sink->pools.end()) {
    // Only a sink of this site can write the image (failed over elsewhere).
    src->set_stand_down([this, v]() { return StandDownReason(v); });
    src->set_image_gate(gate_);
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
  v.snapshot_tiers = r.snapshot_tiers.empty() ? src.snapshot_tiers : r.snapshot_tiers;
  v.outage_snapshots = src.outage_snapshots;
  v.compression = src.compression;
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
    // Their own rules, not only as [source] resolves them now: a member
    // that inherits [source]'s would differ once [source] changes.
    const auto theirs = RegisteredVolume(other).retention, mine = RegisteredVolume(r).retention;
    if (theirs != mine || other.retention != r.retention) {
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

Status Daemon::TakesRegistrations() const {
  if (config_.source) return OkStatus();
  return FailedPrecondition(
      "this cairnd takes no registrations: add a [source] section (pools, peer) to its config");
}

StatusOr<Daemon::Prepared> Daemon::PrepareRegistration(const Registration& req) {
  RETURN_IF_ERROR(TakesRegistrations());
  RETURN_IF_ERROR(ValidateVolumeId(req.volume));
  if (req.image.empty()) return InvalidArgument("register: no image");
  const auto& pools = config_.source->pools;
  if (std::find(pools.begin(), pools.end(), req.pool) == pools.end()) {
    return FailedPrecondition(
        fmt::format("pool '{}' is not one of this cairnd's [source] pools ({}): add it there",
                    req.pool, fmt::join(pools, ", ")));
  }
  Prepared p{req, RegisteredVolume(req), false, std::nullopt};
  Registration& r = p.r;
  r.target_pool = p.v.target_pool;
  r.target_image = p.v.target_image;
  ASSIGN_OR_RETURN(auto pool, OpenPool(r.pool));
  ASSIGN_OR_RETURN(bool exists, pool->Exists(r.image));
  if (!exists) {
    return NotFound(
        fmt::format("image {}/{} does not exist at site {}", r.pool, r.image, config_.site));
  }
  {
    std::lock_guard lock(sources_mu_);
    if (auto it = registered_.find(r.volume); it != registered_.end()) {
      if (!SameRegistration(it->second, r)) {
        return AlreadyExists(fmt::format(
            "volume '{}' is registered already, for {}/{} -> {}/{}: unregister it first", r.volume,
            it->second.pool, it->second.image, it->second.target_pool, it->second.target_image));
      }
      // Known only if it also runs: a registration whose start failed
      // (its group's restart) is started again.
      const bool runs = std::any_of(sources_.begin(), sources_.end(),
                                    [&](const auto& s) { return s->config().id == r.volume; });
      p.known = runs && it->second.group == r.group && it->second.retention == r.retention &&
                it->second.snapshot_tiers == r.snapshot_tiers;
      if (!p.known) p.moved_from = it->second;
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
  if (!p.known) RETURN_IF_ERROR(CheckGroupRegistration(r, *pool));
  return p;
}

Status Daemon::RecordRegistrations(const std::vector<Prepared>& ps, const std::string& except) {
  if (ps.empty()) return OkStatus();
  std::map<std::string, std::string> entries;
  for (const auto& p : ps) entries["volume/" + p.r.volume] = EncodeRegistration(p.r);
  ASSIGN_OR_RETURN(auto kv, cluster_->OpenKvStore(ps.front().r.pool, kRegistryObject));
  RETURN_IF_ERROR(kv->Commit(entries, {}));
  std::set<std::string> left;  // old groups that go on without a member
  {
    std::lock_guard lock(sources_mu_);
    for (const auto& p : ps) registered_[p.r.volume] = p.r;
  }
  // A move: the volume leaves its own schedule or its old group, then
  // joins the new one, from its point.
  for (const auto& p : ps) {
    if (!p.moved_from) continue;
    if (p.moved_from->group.empty()) StopSource(p.r.volume);
    if (!p.moved_from->group.empty() && p.moved_from->group != except) {
      left.insert(p.moved_from->group);
    }
  }
  // Every old group restarted, even after one fails: none may go on
  // running a member the registry has moved.
  Status out;
  for (const auto& g : left) {
    if (Status st = RestartRegisteredGroup(g); !st.ok() && out.ok()) out = st;
  }
  return out;
}

StatusOr<VolumeStatusInfo> Daemon::Register(const Registration& req) {
  std::lock_guard registering(register_mu_);
  ASSIGN_OR_RETURN(const Prepared p, PrepareRegistration(req));
  const Registration& r = p.r;
  if (!p.known) {
    RETURN_IF_ERROR(RecordRegistrations({p}, r.group));
    if (r.group.empty()) {
      ASSIGN_OR_RETURN(auto src, StartSource(p.v));
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

StatusOr<std::vector<VolumeStatusInfo>> Daemon::RegisterMany(const std::vector<Registration>& rs) {
  RETURN_IF_ERROR(TakesRegistrations());
  std::lock_guard registering(register_mu_);
  return RegisterManyLocked(rs);
}

StatusOr<std::vector<VolumeStatusInfo>> Daemon::RegisterManyLocked(
    const std::vector<Registration>& rs) {
  if (rs.empty()) return InvalidArgument("register_volumes names no volume");
  const std::string group = rs.front().group;
  std::set<std::string> volumes, images;
  for (const auto& r : rs) {
    if (group.empty() || r.group != group || r.pool != rs.front().pool) {
      return InvalidArgument(
          "register_volumes takes the members of one consistency group, in one pool (each names "
          "it): register other volumes one by one");
    }
    if (!volumes.insert(r.volume).second || !images.insert(r.image).second) {
      return InvalidArgument(
          fmt::format("register_volumes names volume '{}' or image '{}' twice", r.volume, r.image));
    }
  }
  std::vector<Prepared> changed;
  const VolumeConfig first = RegisteredVolume(rs.front());
  for (const auto& r : rs) {
    ASSIGN_OR_RETURN(Prepared p, PrepareRegistration(r));
    if (p.v.target_pool != first.target_pool || p.v.retention != first.retention) {
      return InvalidArgument(fmt::format(
          "volumes '{}' and '{}' of group {} differ in target pool or retention: a group's members "
          "share both",
          first.id, r.volume, group));
    }
    if (!p.known) changed.push_back(std::move(p));
  }
  if (!changed.empty()) {
    RETURN_IF_ERROR(RecordRegistrations(changed, group));
    RETURN_IF_ERROR(RestartRegisteredGroup(group));
    spdlog::info("group {}: {} volumes registered at once ({} already were)", group, changed.size(),
                 rs.size() - changed.size());
  }
  std::vector<VolumeStatusInfo> out;
  for (const auto& r : rs) {
    auto s = FindSource(r.volume);
    if (!s) return Internal(fmt::format("registered volume {} vanished", r.volume));
    out.push_back(s->Report());
  }
  return out;
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
