// Daemon: failover and failback both ways. A source whose image holds a
// restore point tells its sink (BasePointOf); a source whose image this
// site's sink writes stands by (StandDownReason); a planned failback ends
// the replication in reverse and hands the volume back (Failback).
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "engine/daemon/daemon.h"
#include "engine/daemon/registry.h"

namespace cairn {

StatusOr<std::optional<SourceReplicator::BasePoint>> Daemon::BasePointOf(const VolumeConfig& v) {
  using Base = SourceReplicator::BasePoint;
  ASSIGN_OR_RETURN(auto kv, OpenCatalog(v.pool));
  Catalog catalog(*kv);
  // Failed over here into this very image: the point it was cloned from.
  ASSIGN_OR_RETURN(auto promoted, catalog.GetPromotion(v.id));
  if (promoted && promoted->pool == v.pool && promoted->image == v.image) {
    ASSIGN_OR_RETURN(RestorePoint p, catalog.Get(v.id, promoted->seq));
    ASSIGN_OR_RETURN(std::string keep, catalog.Resolution(v.id));
    return std::optional<Base>(Base{std::move(p), keep == config_.site});
  }
  // Written here by replication in reverse: its newest point.
  ASSIGN_OR_RETURN(auto points, catalog.Points(v.id));
  for (auto it = points.rbegin(); it != points.rend(); ++it) {
    if (it->pool == v.pool && it->image == v.image) return std::optional<Base>(Base{*it, false});
  }
  return std::optional<Base>();
}

StatusOr<std::string> Daemon::StandDownReason(const VolumeConfig& v) {
  ASSIGN_OR_RETURN(auto kv, OpenCatalog(v.pool));
  Catalog catalog(*kv);
  ASSIGN_OR_RETURN(const std::string owner, catalog.ImageOwner(v.pool, v.image));
  if (owner.empty()) return std::string();
  if (owner != v.id) {
    return fmt::format("{}/{} is the standby image of volume '{}' at this site's sink", v.pool,
                       v.image, owner);
  }
  ASSIGN_OR_RETURN(const auto latest, catalog.Latest(v.id));
  return fmt::format(
      "volume '{}' failed over to site {}, which replicates it back into {}/{} (newest point "
      "{}); `cairn failback {}` there makes this image the primary again",
      v.id, latest ? latest->epoch.source_site : "?", v.pool, v.image,
      latest ? latest->epoch.seq : 0, v.id);
}

StatusOr<std::shared_ptr<SourceReplicator>> Daemon::RetireSource(const std::string& volume) {
  std::shared_ptr<SourceReplicator> src;
  std::optional<Registration> r;
  {
    std::lock_guard lock(sources_mu_);
    for (auto s = sources_.begin(); s != sources_.end(); ++s) {
      if ((*s)->config().id == volume) {
        src = *s;
        break;
      }
    }
    if (auto it = registered_.find(volume); it != registered_.end()) r = it->second;
  }
  if (!src) return NotFound(fmt::format("volume '{}' has no source at this cairnd", volume));
  if (r) {
    RETURN_IF_ERROR(ForgetRegistration(volume));
  } else {
    spdlog::warn(
        "volume {}: failed back; remove its [volume {}] section here, or it replicates "
        "again from {}/{} when cairnd restarts",
        volume, volume, src->config().pool, src->config().image);
  }
  {
    std::lock_guard lock(sources_mu_);
    sources_.erase(std::remove(sources_.begin(), sources_.end(), src), sources_.end());
  }
  return src;
}

Status Daemon::ForgetRegistration(const std::string& volume) {
  std::optional<Registration> r;
  {
    std::lock_guard lock(sources_mu_);
    if (auto it = registered_.find(volume); it != registered_.end()) r = it->second;
  }
  if (!r) return OkStatus();
  ASSIGN_OR_RETURN(auto kv, cluster_->OpenKvStore(r->pool, kRegistryObject));
  RETURN_IF_ERROR(kv->Commit({}, {"volume/" + volume}));
  std::lock_guard lock(sources_mu_);
  registered_.erase(volume);
  return OkStatus();
}

StatusOr<std::pair<Catalog::Promotion, RestorePoint>> Daemon::FindPromotion(
    const std::string& volume) {
  for (const auto& pool : config_.sink->pools) {
    ASSIGN_OR_RETURN(auto kv, OpenCatalog(pool));
    Catalog catalog(*kv);
    ASSIGN_OR_RETURN(const auto promoted, catalog.GetPromotion(volume));
    if (!promoted) continue;
    ASSIGN_OR_RETURN(RestorePoint from, catalog.Get(volume, promoted->seq));
    return std::make_pair(*promoted, std::move(from));
  }
  return FailedPrecondition(fmt::format(
      "volume '{}' is not failed over to site {}: nothing to fail back", volume, config_.site));
}

StatusOr<std::string> Daemon::ReleaseFailedOver(const std::string& volume) {
  std::lock_guard registering(register_mu_);  // not beside a (un)registration
  // The source that replicates the promoted image back (cairn failover)
  // ends with the promotion: its image is renamed away.
  std::shared_ptr<SourceReplicator> back;
  if (auto found = FindPromotion(volume); found.ok()) {
    const auto& promoted = found->first;
    back = FindSource(volume);
    if (back && (back->config().pool != promoted.pool || back->config().image != promoted.image)) {
      back.reset();
    }
    if (back && !back->group().empty()) return ReleaseGroupMember(volume, back->group(), promoted);
  }
  if (back) back->Stop();
  auto kept = sink_->Release(volume);
  if (!kept.ok()) {
    if (back) {  // nothing changed: it goes on replicating back
      auto again = StartSource(back->config());
      if (again.ok()) {
        std::lock_guard lock(sources_mu_);
        std::replace(sources_.begin(), sources_.end(), back, *again);
      }
    }
    return kept.status();
  }
  if (back) {
    if (auto retired = RetireSource(volume); !retired.ok()) {
      spdlog::error("volume {}: {}", volume, retired.status().ToString());
    } else {
      spdlog::warn("volume {}: no longer replicated back from {}/{}: released", volume,
                   back->config().pool, back->config().image);
    }
  }
  return kept;
}

Status Daemon::CheckNothingLeftBehind(const Catalog::Promotion& promoted, uint64_t seq,
                                      const std::string& home) {
  ASSIGN_OR_RETURN(auto pool, OpenPool(promoted.pool));
  ASSIGN_OR_RETURN(auto vol, pool->Open(promoted.image));
  ASSIGN_OR_RETURN(const auto snaps, vol->ListSnaps());
  const auto snap = std::find_if(snaps.begin(), snaps.end(),
                                 [&](const SnapInfo& s) { return s.name == SnapName(seq); });
  if (snap == snaps.end()) {
    return FailedPrecondition(fmt::format("{}/{} has no snapshot {} of restore point {}",
                                          promoted.pool, promoted.image, SnapName(seq), seq));
  }
  ASSIGN_OR_RETURN(const auto clients, vol->OtherClients());
  if (!clients.empty()) {
    return FailedPrecondition(fmt::format(
        "{}/{} is held open by {}: detach the volume (stop its writers), then fail back; "
        "writes made after the final delta would not reach site {}",
        promoted.pool, promoted.image, fmt::join(clients, ", "), home));
  }
  ASSIGN_OR_RETURN(const uint64_t written, BytesSince(*vol, *snap));
  if (written > 0) {
    return FailedPrecondition(fmt::format(
        "{}/{} was written after restore point {} ({} bytes): stop its writers (detach the "
        "volume), then fail back again; the final delta carries those writes",
        promoted.pool, promoted.image, seq, written));
  }
  return OkStatus();
}

StatusOr<ControlService::FailedBack> Daemon::Failback(const std::string& volume, uint64_t seq) {
  if (!sink_) {
    return FailedPrecondition(
        "this cairnd is not a sink: fail back on the cairnd of the site the volume failed over "
        "to");
  }
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  ASSIGN_OR_RETURN(const auto found, FindPromotion(volume));
  const auto& [promoted, from] = found;
  const std::string& home = from.epoch.source_site;
  std::lock_guard registering(register_mu_);  // not beside a (un)registration
  const auto src = FindSource(volume);
  if (src && !src->group().empty()) {
    return FailedPrecondition(fmt::format(
        "volume '{}' replicates back as a member of group {}: `cairn group failback {}` brings "
        "the whole group home at one point (or `cairn release {}` takes it out of the group)",
        volume, src->group(), src->group(), volume));
  }
  if (!src || src->config().pool != promoted.pool || src->config().image != promoted.image) {
    return FailedPrecondition(fmt::format(
        "no source at this cairnd replicates the promoted image {}/{} of '{}' back to site {}: "
        "`cairn failover` sets one up (with a [source] section), or register it (`cairn "
        "register`); once it has replicated, fail back",
        promoted.pool, promoted.image, volume, home));
  }
  const VolumeStatusInfo now = src->Report();
  const uint64_t want = seq != 0 ? seq : now.last_seq;
  if (want <= promoted.seq || now.last_seq < want) {
    return FailedPrecondition(fmt::format(
        "restore point {} of '{}' has not reached site {} yet (newest there: {}{}): replicate "
        "(`cairn replicate {} --wait`), then fail back",
        want, volume, home, now.last_seq, now.error.empty() ? "" : "; " + now.error, volume));
  }
  RETURN_IF_ERROR(CheckNothingLeftBehind(promoted, want, home));
  src->Stop();  // nothing more goes back from here
  auto home_said = src->HandBack(want);
  if (!home_said.ok()) {
    // Nothing changed at either site: the volume goes on replicating back.
    auto again = StartSource(src->config());
    if (again.ok()) {
      std::lock_guard lock(sources_mu_);
      std::replace(sources_.begin(), sources_.end(), src, *again);
    }
    return home_said.status().Annotate(fmt::format(
        "handing '{}' back to site {}; nothing changed, it still replicates there", volume, home));
  }
  if (auto retired = RetireSource(volume); !retired.ok()) {
    spdlog::error("volume {}: {}", volume, retired.status().ToString());
  }
  HandedBack said = *home_said;
  said.site = home;  // the site its points came from, as its catalog names it
  auto folded = sink_->FoldBack(volume, want, said);
  if (!folded.ok()) {
    return folded.status().Annotate(fmt::format(
        "site {} has '{}' back as its primary at restore point {}, but this site could not make "
        "that point its own; `cairn release {}` here lets site {} replicate again, resending what "
        "changed since point {}",
        home, volume, want, volume, home, promoted.seq));
  }
  spdlog::warn(
      "volume {}: FAILED BACK to site {} at restore point {} with nothing lost; {} bytes taken "
      "into the standby image here; the promoted image is kept as {}",
      volume, home, want, folded->copied_bytes, folded->kept_as);
  return FailedBack{want, home, folded->kept_as, folded->copied_bytes};
}

}  // namespace cairn
