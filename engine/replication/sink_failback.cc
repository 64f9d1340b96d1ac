// Sink: replication in reverse after a failover (failback). The image
// this sink writes was the volume's primary; it holds, as a snapshot of
// its own, the restore point the source's image was promoted from. That
// point becomes this sink's base: only what changed since flows back.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <ctime>
#include <optional>
#include <string_view>

#include "engine/replication/sink.h"
#include "engine/replication/sink_target.h"
#include "proto/cairn.pb.h"

namespace cairn {
std::string UtcStamp(int64_t unix_ns) {
  const std::time_t t = static_cast<std::time_t>(unix_ns / 1'000'000'000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &tm);
  return stamp;
}

StatusOr<std::string> Sink::ImageOwnerFor(const Target& t) {
  ASSIGN_OR_RETURN(std::string owner, t.catalog->ImageOwner(t.pool_name, t.image));
  if (!owner.empty() && owner != t.volume) {
    return FailedPrecondition(fmt::format(
        "image {}/{} is the standby of volume '{}', not of '{}': set another target_image",
        t.pool_name, t.image, owner, t.volume));
  }
  return owner;
}

Status Sink::KeepDivergent(const Target& t, Volume& vol, const std::vector<SnapInfo>& snaps,
                           uint64_t seq, uint64_t divergent, int64_t now) {
  const std::string kept = "cairn-divergent-" + UtcStamp(now);
  std::vector<std::string> renamed;
  for (const SnapInfo& s : snaps) {
    const auto n = ParseSnapName(s.name);
    if (!n || *n <= seq) continue;
    RETURN_IF_ERROR(vol.RenameSnap(s.name, kept + "." + s.name));
    renamed.push_back(kept + "." + s.name);
  }
  if (divergent > 0) RETURN_IF_ERROR(vol.CreateSnap(kept));
  if (seq > 0 && (divergent > 0 || !renamed.empty())) {
    spdlog::warn(
        "volume {}: {}/{} had {} bytes written since restore point {} and {} later snapshot(s): "
        "kept as snapshot {}{}{} before replication from site {} puts it back to the point",
        t.volume, t.pool_name, t.image, divergent, seq, renamed.size(),
        divergent > 0 ? kept : "(none: the head held the point)", renamed.empty() ? "" : ", ",
        fmt::join(renamed, ", "), t.source_site);
  }
  return OkStatus();
}

std::optional<SnapInfo> ResyncBaseOf(const std::vector<SnapInfo>& snaps) {
  constexpr std::string_view kPrefix = "cairn-divergent-";
  std::optional<SnapInfo> newest;
  for (const SnapInfo& s : snaps) {
    const std::string_view n = s.name;
    if (n.starts_with(kPrefix) && n.find('.') == std::string_view::npos &&
        (!newest || s.name > newest->name)) {
      newest = s;
    }
  }
  return newest;
}

Status Sink::AdoptWithoutPoint(Target& t, const pb::Hello& hello, const std::string& owner,
                               Volume& vol, const std::vector<SnapInfo>& snaps,
                               const std::optional<SnapInfo>& share) {
  const uint64_t seq = hello.base_point().seq();
  if (owner == t.volume && ResyncBaseOf(snaps)) return OkStatus();  // adopted so before
  // A group member's point came from its share of the group snapshot:
  // that share is here, so the image is the volume's, at the point or
  // written since. It cannot be the head's base (no rollback to a share),
  // but it tells whether this site wrote since: if only one side did, the
  // image is resynced by digests with no operator.
  bool lineage = false;
  if (share) {
    ASSIGN_OR_RETURN(const bool written_here, vol.ChangedSince(*share));
    if (written_here && hello.base_written_bytes() > 0 && !hello.keep_source()) {
      return FailedPrecondition(
                 fmt::format("split brain: since group restore point {} of volume '{}' ({}), "
                             "both this site and site {} wrote to the volume; nothing moves "
                             "until you choose, at site {}'s cairnd: `cairn resolve {} --keep {}` "
                             "or `cairn resolve {} --keep {}`",
                             seq, t.volume, share->name, t.source_site, t.source_site, t.volume,
                             t.source_site, t.volume, env_.site))
          .WithReason(Reason::kSplitBrain);
    }
    lineage = true;
  }
  // Nothing tells what this image holds: the volume as this site wrote it
  // since the point, or another image under its name. Only an operator
  // says it may be written.
  if (!lineage && !hello.keep_source()) {
    return FailedPrecondition(
               fmt::format(
                   "image {}/{} has no snapshot of restore point {} of volume '{}' (site {} "
                   "changed {} bytes of its image since): what this site wrote since cannot be "
                   "told apart, and nothing moves until you choose, at site {}'s cairnd: `cairn "
                   "resolve {} --keep {}` (this image is kept here as a snapshot and compared "
                   "block by block: only blocks that differ move) or `cairn resolve {} --keep {}` "
                   "(site {}'s image is kept aside there and site {} replicates again)",
                   t.pool_name, t.image, seq, t.volume, t.source_site, hello.base_written_bytes(),
                   t.source_site, t.volume, t.source_site, t.volume, env_.site, t.source_site,
                   env_.site))
        .WithReason(Reason::kSplitBrain);
  }
  // The head as it is, and every cairn.<N> (none of them is the point),
  // are kept; the first epoch compares the head, as kept, with the
  // source's image by digests and writes only the blocks that differ.
  const int64_t now = env_.clock->UnixNs();
  RETURN_IF_ERROR(KeepDivergent(t, vol, snaps, 0, 1, now));
  RETURN_IF_ERROR(t.catalog->SetImageOwner(t.pool_name, t.image, t.volume));
  spdlog::warn(
      "volume {}: replication in reverse from site {}: {}/{} has no snapshot of restore point {} "
      "the source's image comes from; it is kept as snapshot cairn-divergent-{} and resynced by "
      "block digests (only blocks that differ move)",
      t.volume, t.source_site, t.pool_name, t.image, seq, UtcStamp(now));
  return OkStatus();
}

Status Sink::RecordAdoption(Target& t, const RestorePoint& base, const std::string& snap,
                            int64_t now) {
  RestorePoint adopted = base;
  adopted.pool = t.pool_name;
  adopted.image = t.image;
  adopted.snap = snap;
  adopted.created_time_ns = now;
  adopted.epoch.source_site = t.source_site;  // the chain goes on from this source
  RETURN_IF_ERROR(t.catalog->SetImageOwner(t.pool_name, t.image, t.volume));
  return t.catalog->AddPoint(adopted);
}

Status Sink::AdoptShare(Target& t, const RestorePoint& base, Volume& vol,
                        const std::vector<SnapInfo>& snaps) {
  const uint64_t seq = base.epoch.seq;
  const std::string name = SnapName(seq);
  const int64_t now = env_.clock->UnixNs();
  const std::string kept = "cairn-divergent-" + UtcStamp(now);
  for (const SnapInfo& s : snaps) {
    if (s.name == name) RETURN_IF_ERROR(vol.RenameSnap(s.name, kept + "." + s.name));
  }
  RETURN_IF_ERROR(KeepDivergent(t, vol, snaps, seq, 0, now));
  RETURN_IF_ERROR(vol.CreateSnap(name, Volume::Writers::kThisProcessOnly));
  RETURN_IF_ERROR(RecordAdoption(t, base, name, now));
  spdlog::warn(
      "volume {}: replication in reverse from site {}: {}/{} is unchanged since its share of "
      "group point {}: adopted as {} (its own earlier {} kept as {}.{}), the base of the next "
      "epoch",
      t.volume, t.source_site, t.pool_name, t.image, seq, name, name, kept, name);
  return OkStatus();
}

Status Sink::AdoptBase(Target& t, const pb::Hello& hello) {
  const pb::RestorePoint& m = hello.base_point();
  ASSIGN_OR_RETURN(auto latest, t.catalog->Latest(t.volume));
  if (latest) return OkStatus();  // the volume's points are here: the usual chain
  ASSIGN_OR_RETURN(RestorePoint base, RestorePointFromProto(m, "the base point of the Hello"));
  if (base.epoch.volume != t.volume || base.epoch.seq == 0) {
    return InvalidArgument(fmt::format("the Hello of volume '{}' names base point {} of '{}'",
                                       t.volume, base.epoch.seq, base.epoch.volume));
  }
  ASSIGN_OR_RETURN(const std::string owner, ImageOwnerFor(t));
  ASSIGN_OR_RETURN(bool exists, t.pool->Exists(t.image));
  if (!exists) return OkStatus();  // nothing to adopt: a first, full epoch makes it
  // A source of this process snapshotting the image is done first, and
  // takes none while this runs; once the adoption is in the catalog, it
  // stands by (image_gate.h).
  const ImageGate::Token held = env_.gate ? env_.gate->Hold(t.pool_name, t.image) : nullptr;
  ASSIGN_OR_RETURN(auto vol, t.pool->Open(t.image));
  ASSIGN_OR_RETURN(auto snaps, vol->ListSnaps());
  const std::string name = SnapName(base.epoch.seq);
  auto snap = std::find_if(snaps.begin(), snaps.end(), [&](const SnapInfo& s) {
    return s.name == name && s.time_ns == base.epoch.snap_time_ns;
  });
  // Written from now on by this sink: a guest still on it would see its
  // disk change under it, and its writes would be lost.
  ASSIGN_OR_RETURN(const auto clients, vol->OtherClients());
  if (!clients.empty()) {
    return FailedPrecondition(fmt::format(
        "{}/{} is held open by {} (a guest still attached to the old primary?): detach it; "
        "replication back from site {} starts then",
        t.pool_name, t.image, fmt::join(clients, ", "), t.source_site));
  }
  // The point is gone here (pruned, or the image is another), or it is a
  // group member's share: resynced by digests from the image as it is.
  if (snap == snaps.end()) {
    std::optional<SnapInfo> share;
    if (!base.epoch.group.empty()) {
      auto it = std::find_if(snaps.begin(), snaps.end(), [&](const SnapInfo& s) {
        return s.name == GroupSnapName(name) && s.time_ns == base.epoch.snap_time_ns;
      });
      if (it != snaps.end()) share = *it;
    }
    // (Owned already with no resync begun: an adoption cut before its point.)
    if (share && (owner.empty() || (owner == t.volume && !ResyncBaseOf(snaps)))) {
      ASSIGN_OR_RETURN(const bool written_here, vol->ChangedSince(*share));
      if (!written_here) return AdoptShare(t, base, *vol, snaps);
    }
    return AdoptWithoutPoint(t, hello, owner, *vol, snaps, share);
  }
  const SnapInfo point = *snap;
  ASSIGN_OR_RETURN(const uint64_t divergent, BytesSince(*vol, point));
  if (divergent > 0 && hello.base_written_bytes() > 0 && !hello.keep_source()) {
    return FailedPrecondition(
               fmt::format(
                   "split brain: since restore point {} of volume '{}', site {} changed {} bytes "
                   "of {}/{} and site {} changed {} bytes of its image; nothing moves until you "
                   "choose, at site {}'s cairnd: `cairn resolve {} --keep {}` (site {}'s "
                   "writes are kept here as a snapshot) or `cairn resolve {} --keep {}` (site "
                   "{}'s image is kept aside there and site {} replicates again)",
                   base.epoch.seq, t.volume, env_.site, divergent, t.pool_name, t.image,
                   t.source_site, hello.base_written_bytes(), t.source_site, t.volume,
                   t.source_site, env_.site, t.volume, env_.site, t.source_site, env_.site))
        .WithReason(Reason::kSplitBrain);
  }
  const int64_t now = env_.clock->UnixNs();
  RETURN_IF_ERROR(KeepDivergent(t, *vol, snaps, base.epoch.seq, divergent, now));
  RETURN_IF_ERROR(RecordAdoption(t, base, name, now));
  spdlog::warn(
      "volume {}: replication in reverse from site {}: restore point {} adopted as {}/{}@{} "
      "(taken {} ns), the base of the next epoch",
      t.volume, t.source_site, base.epoch.seq, t.pool_name, t.image, name, point.time_ns);
  return OkStatus();
}

namespace {

std::optional<SnapInfo> Named(const std::vector<SnapInfo>& snaps, const std::string& name) {
  for (const SnapInfo& s : snaps) {
    if (s.name == name) return s;
  }
  return std::nullopt;
}

StatusOr<std::optional<SnapInfo>> FindSnap(Volume& vol, const std::string& name) {
  ASSIGN_OR_RETURN(auto snaps, vol.ListSnaps());
  return Named(snaps, name);
}

}  // namespace

StatusOr<std::optional<SnapInfo>> Sink::HandedBackBefore(const Target& t, uint64_t seq) {
  // The image is nobody's standby and holds the point.
  ASSIGN_OR_RETURN(const std::string owner, ImageOwnerFor(t));
  ASSIGN_OR_RETURN(const bool exists, t.pool->Exists(t.image));
  if (!owner.empty() || !exists) return std::optional<SnapInfo>();
  ASSIGN_OR_RETURN(auto vol, t.pool->Open(t.image));
  ASSIGN_OR_RETURN(auto snap, FindSnap(*vol, SnapName(seq)));
  if (snap) {
    spdlog::info("volume {}: {}/{} was handed back at restore point {} before; said again",
                 t.volume, t.pool_name, t.image, seq);
  }
  return snap;
}

Status Sink::HandBack(Link& link, Target& t, const pb::Hello& hello) {
  const uint64_t seq = hello.hand_back_seq();
  const std::string name = SnapName(seq);
  auto answer = [&](const ChainDigest& chain, const SnapInfo& snap) {
    pb::HelloReply reply;
    reply.set_protocol_version(kProtocolVersion);
    reply.set_last_applied_seq(seq);
    reply.set_last_chain(chain.AsBytes());
    reply.set_sink_site(env_.site);
    reply.set_last_point_time_ns(snap.time_ns);
    return link.Send(FrameType::kHelloReply, reply.SerializeAsString(), {});
  };
  ASSIGN_OR_RETURN(const std::optional<RestorePoint> latest, LoadLatest(t));
  if (!latest) {
    ASSIGN_OR_RETURN(const auto before, HandedBackBefore(t, seq));
    if (before) return answer(ChainDigest(), *before);
    return FailedPrecondition(fmt::format(
        "volume '{}' has no restore point at site {} to hand back as {}/{}: replicate it here "
        "first",
        t.volume, env_.site, t.pool_name, t.image));
  }
  if (latest->epoch.seq != seq) {
    return FailedPrecondition(fmt::format(
        "the newest restore point of volume '{}' at site {} is {}, not {}: the final epoch did "
        "not complete here; replicate again, then fail back",
        t.volume, env_.site, latest->epoch.seq, seq));
  }
  if (latest->pool != t.pool_name || latest->image != t.image) {
    return FailedPrecondition(
        fmt::format("restore point {} of volume '{}' is on {}/{} here, not on {}/{}", seq, t.volume,
                    latest->pool, latest->image, t.pool_name, t.image));
  }
  ASSIGN_OR_RETURN(const auto spooled, env_.spools->List(t.volume));
  for (const uint64_t s : spooled) {
    if (s > seq) {
      return FailedPrecondition(fmt::format(
          "epoch {} of volume '{}' is spooled at site {}, after restore point {}: let it be "
          "applied (replicate again), then fail back",
          s, t.volume, env_.site, seq));
    }
  }
  ASSIGN_OR_RETURN(auto vol, t.pool->Open(t.image));
  ASSIGN_OR_RETURN(const std::optional<SnapInfo> point, FindSnap(*vol, name));
  if (!point) {
    return FailedPrecondition(fmt::format("{}/{} has no snapshot {} of restore point {}",
                                          t.pool_name, t.image, name, seq));
  }
  // The head becomes the primary: exactly the point, not what an epoch
  // that never completed left on it.
  ASSIGN_OR_RETURN(const uint64_t reverted, RevertToPoint(*vol, *point));
  if (reverted > 0) {
    spdlog::warn(
        "volume {}: {}/{} held {} bytes written after restore point {} by an epoch "
        "that did not complete; put back as in the point before the hand-back",
        t.volume, t.pool_name, t.image, reverted, seq);
  }
  RETURN_IF_ERROR(t.catalog->HandBack(t.volume, t.pool_name, t.image));
  for (const uint64_t s : spooled) (void)env_.spools->Remove(t.volume, s);
  spdlog::warn(
      "volume {}: FAILED BACK to site {}: {}/{} is the volume's primary again, at restore point "
      "{} from site {} (snapshot {}); this sink no longer takes the volume into it",
      t.volume, env_.site, t.pool_name, t.image, seq, t.source_site, name);
  return answer(latest->chain_digest, *point);
}

StatusOr<Sink::FoldedBack> Sink::FoldBack(const std::string& volume, uint64_t seq,
                                          const HandedBack& home, const std::string& group,
                                          uint32_t group_members) {
  const std::string& source_site = home.site;
  ASSIGN_OR_RETURN(const std::string pool_name, FindVolumePool(volume));
  ASSIGN_OR_RETURN(auto kv, env_.open_catalog(pool_name));
  Catalog catalog(*kv);
  ASSIGN_OR_RETURN(const auto promoted, catalog.GetPromotion(volume));
  if (!promoted) {
    return FailedPrecondition(fmt::format(
        "volume '{}' is not failed over at site {}: nothing to fail back", volume, env_.site));
  }
  ASSIGN_OR_RETURN(const auto latest, catalog.Latest(volume));
  if (!latest) return NotFound(fmt::format("volume '{}' has no restore point", volume));
  FoldedBack out;
  if (latest->epoch.seq != seq) {  // else folded back before: only the release is left
    if (seq <= promoted->seq || latest->epoch.seq != promoted->seq) {
      return FailedPrecondition(fmt::format(
          "volume '{}' was promoted from restore point {} but its newest point here is {}: its "
          "standby image cannot take point {} as a delta; release it (`cairn release {}`), and "
          "site {} resends what changed since its own newest point here",
          volume, promoted->seq, latest->epoch.seq, seq, volume, source_site));
    }
    ASSIGN_OR_RETURN(auto pool, env_.open_pool(pool_name));
    ASSIGN_OR_RETURN(auto promoted_vol, pool->Open(promoted->image));
    ASSIGN_OR_RETURN(auto promoted_snaps, promoted_vol->ListSnaps());
    const auto from = Named(promoted_snaps, SnapName(promoted->seq));
    const auto to = Named(promoted_snaps, SnapName(seq));
    if (!from || !to) {
      return FailedPrecondition(
          fmt::format("the promoted image {}/{} has no snapshot {}: release the volume instead",
                      pool_name, promoted->image, SnapName(from ? seq : promoted->seq)));
    }
    ASSIGN_OR_RETURN(auto standby, pool->Open(latest->image));
    ASSIGN_OR_RETURN(auto standby_snaps, standby->ListSnaps());
    const auto base = Named(standby_snaps, latest->snap);
    if (!base) {
      return FailedPrecondition(fmt::format("standby image {}/{} has no snapshot {} of its point",
                                            pool_name, latest->image, latest->snap));
    }
    if (Named(standby_snaps, SnapName(seq))) {
      // Taken by an earlier attempt that stopped before the catalog record.
      RETURN_IF_ERROR(standby->RemoveSnap(SnapName(seq)));
    }
    RETURN_IF_ERROR(RevertToPoint(*standby, *base).status());
    ASSIGN_OR_RETURN(out.copied_bytes, CopyChanges(*promoted_vol, *from, *to, *standby));
    RETURN_IF_ERROR(standby->CreateSnap(SnapName(seq), Volume::Writers::kThisProcessOnly));
    RestorePoint p;
    p.epoch.volume = volume;
    p.epoch.seq = seq;
    p.epoch.base_seq = promoted->seq;
    p.epoch.image_size = to->size;
    p.epoch.snap_time_ns = home.snap_time_ns;  // its snapshot there, which the next epoch diffs
    p.epoch.source_site = source_site;         // the chain goes on from there
    p.epoch.group = group;
    p.epoch.group_members = group.empty() ? 0 : group_members;
    p.created_time_ns = env_.clock->UnixNs();
    p.pool = pool_name;
    p.image = latest->image;
    p.snap = SnapName(seq);
    p.data_bytes = out.copied_bytes;
    p.chain_digest = home.chain;
    RETURN_IF_ERROR(catalog.AddPoint(p));
    spdlog::warn(
        "volume {}: what {}/{} changed from restore point {} to {} ({} bytes) copied into the "
        "standby image {}/{}, checked by hash: restore point {}; site {} replicates from it",
        volume, pool_name, promoted->image, promoted->seq, seq, out.copied_bytes, pool_name,
        latest->image, seq, source_site);
  }
  ASSIGN_OR_RETURN(out.kept_as, Release(volume));
  return out;
}

}  // namespace cairn
