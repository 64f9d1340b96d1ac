// SourceReplicator: its link to the sink: the handshake (Hello), the
// probe, the acks, and the base's digests a resync asks for.

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <memory>
#include <string>

#include "engine/epoch/block_digests.h"
#include "engine/link/codec_link.h"
#include "engine/replication/digest_link.h"
#include "engine/replication/source.h"
#include "proto/cairn.pb.h"

namespace cairn {

StatusOr<uint64_t> SourceReplicator::WrittenSince(uint64_t seq) {
  ASSIGN_OR_RETURN(auto vol, pool_->Open(config_.image));
  ASSIGN_OR_RETURN(auto snaps, vol->ListSnaps());
  const std::string name = SnapName(seq);
  for (const SnapInfo& s : snaps) {
    if (s.name == name) return BytesSince(*vol, s);
  }
  return uint64_t{0};
}

StatusOr<SourceReplicator::SinkHello> SourceReplicator::Handshake(Link& link, bool probe,
                                                                  uint64_t hand_back_seq,
                                                                  uint64_t verify_seq) {
  pb::Hello hello;
  hello.set_protocol_version(kProtocolVersion);
  hello.set_volume(config_.id);
  hello.set_pool(config_.target_pool);
  hello.set_image(config_.target_image);
  hello.set_source_site(site_);
  hello.set_probe(probe);
  hello.set_hand_back_seq(hand_back_seq);
  hello.set_verify_seq(verify_seq);
  if (config_.retention) {
    hello.mutable_retention()->set_keep_points(config_.retention->keep_last);
    hello.mutable_retention()->set_tiers(FormatRetentionTiers(config_.retention->tiers));
  }
  if (base_point_ && hand_back_seq == 0 && verify_seq == 0) {
    auto base = base_point_();
    if (!base.ok()) return base.status().Annotate("looking up the point this image holds");
    pinned_seq_.store(0, std::memory_order_relaxed);
    if (*base) {
      // Kept while it is the base: a planned failback copies what the image
      // changed since it into the other site's standby (Sink::FoldBack).
      pinned_seq_.store((*base)->point.epoch.seq, std::memory_order_relaxed);
      RestorePointToProto((*base)->point, hello.mutable_base_point());
      ASSIGN_OR_RETURN(const uint64_t written, WrittenSince((*base)->point.epoch.seq));
      hello.set_base_written_bytes(written);
      hello.set_keep_source((*base)->keep_source);
    }
  }
  RETURN_IF_ERROR(link.Send(FrameType::kHello, hello.SerializeAsString(), {}));
  auto f = link.Receive(timeouts_.hello);
  if (!f.ok()) {
    // Whatever answers here is not a Cairn sink, or not one that works: its
    // bytes are no corruption of ours.
    const Code code = f.status().code();
    if (code == Code::kDataLoss) {
      return FailedPrecondition(fmt::format(
          "{} answered Hello with bytes that are not a Cairn frame ({}): is another service "
          "listening there? The peer must be a Cairn sink's [sink] listen address",
          link.peer(), f.status().message()));
    }
    if (code == Code::kAborted) {
      return Unavailable(
          fmt::format("{} closed the link without answering Hello ({}): is it a "
                      "Cairn sink?",
                      link.peer(), f.status().message()));
    }
    return f.status();
  }
  if (f->type == FrameType::kLinkError) return StatusFromLinkError(*f, "sink refused");
  pb::HelloReply reply;
  if (f->type != FrameType::kHelloReply || !reply.ParseFromString(f->body)) {
    return FailedPrecondition(
        fmt::format("{} did not answer Hello with HelloReply (got {}): is it a "
                    "Cairn sink?",
                    link.peer(), FrameTypeName(f->type)));
  }
  if (reply.protocol_version() != kProtocolVersion) {
    return FailedPrecondition(fmt::format("sink speaks protocol {}, this source {}: upgrade one",
                                          reply.protocol_version(), kProtocolVersion));
  }
  SinkHello out;
  if (!ChainDigest::FromString(reply.last_chain(), &out.last_chain)) {
    return DataLoss("HelloReply carries a malformed chain digest");
  }
  out.site = reply.sink_site();
  out.last_applied_seq = reply.last_applied_seq();
  out.resume_seq = reply.resume_seq();
  out.resume_records = reply.resume_records();
  out.takes_unchanged = reply.takes_unchanged();
  out.last_point_time_ns = reply.last_point_time_ns();
  out.serves_digests = reply.serves_digests();
  out.resync_base = reply.resync_base();
  out.serves_verify = reply.serves_verify();
  out.takes_compressed = reply.takes_compressed();
  return out;
}

StatusOr<std::string> SourceReplicator::Probe() {
  ASSIGN_OR_RETURN(auto link, connect_());
  ASSIGN_OR_RETURN(const SinkHello reply, Handshake(*link, true));
  link->Close();
  return fmt::format("sink of site '{}' at {} takes volume '{}' into {}/{} (newest point {})",
                     reply.site, link->peer(), config_.id, config_.target_pool,
                     config_.target_image, reply.last_applied_seq);
}

Status SourceReplicator::Connect() {
  ASSIGN_OR_RETURN(auto link, connect_());
  ASSIGN_OR_RETURN(const SinkHello reply, Handshake(*link, false));
  sink_seq_ = reply.last_applied_seq;
  sink_chain_ = reply.last_chain;
  resume_seq_ = reply.resume_seq;
  resume_records_ = reply.resume_records;
  sink_takes_unchanged_ = reply.takes_unchanged;
  sink_point_time_ns_ = reply.last_point_time_ns;
  sink_serves_digests_ = reply.serves_digests;
  sink_resync_base_ = reply.resync_base;
  // Data records go through a CodecLink even uncompressed: it counts them
  // on the wire (wire_bytes_total).
  Compression codec = config_.compression;
  if (codec != Compression::kNone && !reply.takes_compressed) {
    spdlog::warn(
        "volume {}: sink {} does not take compressed records: sending them as they "
        "are (compression = {} needs a newer sink)",
        config_.id, link->peer(), CompressionName(codec));
    codec = Compression::kNone;
  }
  link = std::make_unique<CodecLink>(std::move(link), codec, &wire_bytes_total_);
  std::lock_guard lock(mu_);
  link_ = std::move(link);
  return OkStatus();
}

Status SourceReplicator::AwaitAck(uint64_t seq, int stage, ChainDigest* chain) {
  ASSIGN_OR_RETURN(Frame f, link_->Receive(timeouts_.ack));
  if (f.type == FrameType::kLinkError) return StatusFromLinkError(f, "sink");
  pb::EpochAck ack;
  if (f.type != FrameType::kEpochAck || !ack.ParseFromString(f.body)) {
    return DataLoss(fmt::format("expected EpochAck, got {}", FrameTypeName(f.type)));
  }
  if (ack.seq() != seq || ack.stage() != stage) {
    return DataLoss(fmt::format("ack for epoch {} stage {}, expected epoch {} stage {}", ack.seq(),
                                static_cast<int>(ack.stage()), seq, stage));
  }
  if (chain && !ChainDigest::FromString(ack.chain_digest(), chain)) {
    return DataLoss("EpochAck carries a malformed chain digest");
  }
  return OkStatus();
}

Status AskDigests(Link& link, uint64_t seq, uint64_t offset, uint64_t length, uint32_t grain,
                  uint64_t image_size) {
  pb::DigestRequest rq;
  rq.set_base_seq(seq);
  rq.set_offset(offset);
  rq.set_length(length);
  rq.set_grain(grain);
  rq.set_image_size(image_size);
  return link.Send(FrameType::kDigestRequest, rq.SerializeAsString(), {});
}

StatusOr<std::string> TakeDigests(Link& link, uint64_t offset, uint64_t length, uint32_t grain,
                                  std::chrono::milliseconds timeout) {
  ASSIGN_OR_RETURN(Frame f, link.Receive(timeout));
  if (f.type == FrameType::kLinkError) return StatusFromLinkError(f, "sink");
  pb::DigestReply reply;
  if (f.type != FrameType::kDigestReply || !reply.ParseFromString(f.body) ||
      reply.offset() != offset || reply.grain() != grain) {
    return DataLoss(fmt::format("expected the digests of [{}, +{}) from the sink, got {}", offset,
                                length, FrameTypeName(f.type)));
  }
  return std::move(*reply.mutable_digests());
}

namespace {

// A resync's base digests, asked of the sink over the epoch's link
// (DigestRequest, answered in order: the sink sends nothing else during
// an epoch but a refusal).
class LinkDigests final : public BaseDigests {
 public:
  LinkDigests(Link& link, uint64_t base_seq, std::chrono::milliseconds timeout)
      : link_(link), base_seq_(base_seq), timeout_(timeout) {}

  StatusOr<std::string> Fetch(uint64_t offset, uint64_t length, uint32_t grain,
                              uint64_t image_size) override {
    RETURN_IF_ERROR(AskDigests(link_, base_seq_, offset, length, grain, image_size));
    return TakeDigests(link_, offset, length, grain, timeout_);
  }

 private:
  Link& link_;
  const uint64_t base_seq_;
  const std::chrono::milliseconds timeout_;
};

}  // namespace

std::unique_ptr<BaseDigests> SourceReplicator::SinkDigests() {
  // A window's digests take the sink one read of 64 MiB: as long as a
  // stall between frames may last, not an apply.
  return std::make_unique<LinkDigests>(*link_, sink_seq_, timeouts_.stall);
}

}  // namespace cairn
