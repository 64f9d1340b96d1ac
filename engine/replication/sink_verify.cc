// The sink's half of `cairn verify`: a connection of its own (a verify
// Hello) over which the source asks for the digests of one restore point,
// window by window, and at the end says what it found. The sink never
// takes the source's word for the point's bytes: it reads its own snapshot,
// and records the verdict only if every grain was served from the snapshot
// the point still names.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <memory>

#include "engine/epoch/block_digests.h"
#include "engine/replication/sink.h"
#include "engine/replication/sink_target.h"
#include "proto/cairn.pb.h"

namespace cairn {
namespace {

// The point's snapshot, open for reading.
struct PointSnap {
  std::unique_ptr<Volume> vol;
  SnapInfo snap;
  std::unique_ptr<AsyncIo> io;
};

StatusOr<PointSnap> OpenPointSnap(Pool& pool, const RestorePoint& p) {
  PointSnap out;
  ASSIGN_OR_RETURN(out.vol, pool.Open(p.image));
  ASSIGN_OR_RETURN(const auto snaps, out.vol->ListSnaps());
  auto it =
      std::find_if(snaps.begin(), snaps.end(), [&](const SnapInfo& s) { return s.name == p.snap; });
  if (it == snaps.end()) {
    return FailedPrecondition(
        fmt::format("restore point {} of volume '{}' has no snapshot {}/{}@{}", p.epoch.seq,
                    p.epoch.volume, p.pool, p.image, p.snap));
  }
  out.snap = *it;
  ASSIGN_OR_RETURN(out.io, out.vol->OpenIo(out.snap.name));
  return out;
}

}  // namespace

std::set<uint64_t> Sink::VerifyingPoints(const std::string& volume) const {
  std::lock_guard lock(mu_);
  std::set<uint64_t> out;
  for (const auto& [v, seq] : verifying_) {
    if (v == volume) out.insert(seq);
  }
  return out;
}

Status Sink::ServeVerify(Link& link, Target& t, uint64_t seq) {
  // Held before the point is read: retention between the two would remove it.
  PointHold hold(mu_, verifying_, t.volume, seq);
  ASSIGN_OR_RETURN(const RestorePoint point, t.catalog->Get(t.volume, seq));
  if (!point.epoch.source_site.empty() && point.epoch.source_site != t.source_site) {
    return FailedPrecondition(
        fmt::format("restore point {} of volume '{}' came from site '{}', not from site '{}'", seq,
                    t.volume, point.epoch.source_site, t.source_site));
  }
  ASSIGN_OR_RETURN(PointSnap ps, OpenPointSnap(*t.pool, point));
  pb::HelloReply reply;
  reply.set_protocol_version(kProtocolVersion);
  reply.set_last_applied_seq(seq);
  reply.set_last_chain(point.chain_digest.AsBytes());
  reply.set_sink_site(env_.site);
  reply.set_last_point_time_ns(point.epoch.snap_time_ns);
  reply.set_serves_verify(true);
  RETURN_IF_ERROR(link.Send(FrameType::kHelloReply, reply.SerializeAsString(), {}));
  spdlog::info("volume {}: {} verifies restore point {} ({}@{}, {} bytes)", t.volume, link.peer(),
               seq, ps.vol->name(), ps.snap.name, point.epoch.image_size);
  const uint64_t size = point.epoch.image_size;
  uint64_t served = 0;
  while (true) {
    ASSIGN_OR_RETURN(Frame f, link.Receive(env_.timeouts.stall));
    if (f.type == FrameType::kLinkError) return StatusFromLinkError(f, "source");
    if (f.type == FrameType::kDigestRequest) {
      pb::DigestRequest rq;
      if (!rq.ParseFromString(f.body)) return DataLoss("a DigestRequest that does not parse");
      if (rq.base_seq() != seq || rq.image_size() != size || rq.offset() != served) {
        return DataLoss(fmt::format(
            "a DigestRequest for point {} of {} bytes at {} in a verify of point {} ({} bytes, "
            "served up to {})",
            rq.base_seq(), rq.image_size(), rq.offset(), seq, size, served));
      }
      ASSIGN_OR_RETURN(std::string digests, DigestRange(*ps.io, ps.snap.size, rq.offset(),
                                                        rq.length(), rq.grain(), size));
      served += rq.length();
      pb::DigestReply out;
      out.set_offset(rq.offset());
      out.set_grain(rq.grain());
      out.set_digests(std::move(digests));
      RETURN_IF_ERROR(link.Send(FrameType::kDigestReply, out.SerializeAsString(), {}));
      continue;
    }
    if (f.type != FrameType::kVerifyEnd) {
      return DataLoss(fmt::format("a {} frame in a verify", FrameTypeName(f.type)));
    }
    pb::VerifyEnd end;
    if (!end.ParseFromString(f.body) || end.seq() != seq) {
      return DataLoss(fmt::format("a VerifyEnd that is not of restore point {}", seq));
    }
    if (served < size || end.compared_bytes() != served) {
      return DataLoss(fmt::format(
          "the verify of restore point {} ended with {} bytes compared, {} served, of {}", seq,
          end.compared_bytes(), served, size));
    }
    ps.io.reset();
    if (Status st = ps.vol->ConfirmSnap(ps.snap.name, ps.snap.id); !st.ok()) {
      return DataLoss(fmt::format(
          "restore point {}'s snapshot changed while it was verified; nothing recorded: {}", seq,
          st.message()));
    }
    const PointVerification v{.recorded_ns = env_.clock->UnixNs(),
                              .compared_bytes = served,
                              .mismatched_grains = end.mismatched_grains(),
                              .grain = end.grain()};
    RETURN_IF_ERROR(t.catalog->SetVerification(t.volume, seq, v));
    if (v.mismatched_grains == 0) {
      spdlog::info("volume {}: restore point {} verified: equal to its source ({} bytes)", t.volume,
                   seq, served);
    } else {
      spdlog::error(
          "volume {}: restore point {} DIFFERS from its source in {} grains of {} bytes; "
          "it is not restored without --force",
          t.volume, seq, v.mismatched_grains, v.grain);
    }
    end.set_recorded_ns(v.recorded_ns);
    return link.Send(FrameType::kVerifyEnd, end.SerializeAsString(), {});
  }
}

}  // namespace cairn
