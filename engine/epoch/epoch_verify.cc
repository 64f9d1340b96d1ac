// EpochVerifier: every frame of an epoch checked in order (see epoch.h).
#include <fmt/format.h>

#include <memory>

#include "engine/epoch/epoch.h"
#include "proto/cairn.pb.h"

namespace cairn {
namespace {

template <typename Msg>
Status Parse(const Frame& f, Msg& m) {
  if (!m.ParseFromString(f.body)) {
    return DataLoss(fmt::format("{} frame body does not parse", FrameTypeName(f.type)));
  }
  return OkStatus();
}

// Checks where record `r` lies: in this epoch, next in order, after the
// previous record and inside the image. `next_index`/`next_offset`: where
// the previous record leaves off.
Status CheckRecordPlace(const pb::Record& r, const EpochSummary& epoch, uint64_t next_index,
                        uint64_t next_offset) {
  if (r.seq() != epoch.id.seq) {
    return DataLoss(fmt::format("record of epoch {} inside epoch {}", r.seq(), epoch.id.seq));
  }
  if (r.index() != next_index) {
    return DataLoss(
        fmt::format("record index {} where {} was expected (lost, duplicated or reordered frame)",
                    r.index(), next_index));
  }
  if (r.length() == 0) return DataLoss(fmt::format("record {} has length 0", r.index()));
  if (r.offset() < next_offset) {
    return DataLoss(fmt::format("record {} at offset {} overlaps the previous record (ends at {})",
                                r.index(), r.offset(), next_offset));
  }
  if (r.offset() > epoch.id.image_size || r.length() > epoch.id.image_size - r.offset()) {
    return DataLoss(fmt::format("record {} [{}, +{}) lies beyond the image size {}", r.index(),
                                r.offset(), r.length(), epoch.id.image_size));
  }
  return OkStatus();
}

// What a record's frame carries, once it matches what the record says.
struct CheckedPayload {
  RecordKind kind;
  BlockHash hash;  // of the payload; zero for a zero record
};

// Checks the payload of record `r` (frame `f`) against its kind, length and
// XXH3-64; `max_block` is the epoch's announced largest data record.
StatusOr<CheckedPayload> CheckPayload(const pb::Record& r, const Frame& f, uint32_t max_block) {
  if (r.kind() == pb::ZERO) {
    if (!f.payload.empty()) {
      return DataLoss(fmt::format("zero record {} carries a payload", r.index()));
    }
    return CheckedPayload{RecordKind::kZero, BlockHash()};
  }
  if (r.kind() != pb::DATA) {
    return DataLoss(
        fmt::format("record {} has unknown kind {}", r.index(), static_cast<int>(r.kind())));
  }
  if (r.length() > max_block) {
    return DataLoss(fmt::format("data record {} of {} bytes exceeds the epoch's block size {}",
                                r.index(), r.length(), max_block));
  }
  if (f.payload.size() != r.length()) {
    return DataLoss(fmt::format("data record {} says {} bytes but carries {}", r.index(),
                                r.length(), f.payload.size()));
  }
  const BlockHash h = BlockHash::Of(f.payload);
  if (h != BlockHash(r.xxh3())) {
    return DataLoss(
        fmt::format("block checksum mismatch at offset {} (record {})", r.offset(), r.index()));
  }
  return CheckedPayload{RecordKind::kData, h};
}

}  // namespace

EpochVerifier::EpochVerifier(std::string volume, uint64_t base_seq, ChainDigest prev_chain)
    : volume_(std::move(volume)), base_seq_(base_seq), prev_chain_(prev_chain) {}

StatusOr<EpochVerifier::Step> EpochVerifier::Check(const Frame& f) {
  if (done_) return DataLoss(fmt::format("{} frame after EpochEnd", FrameTypeName(f.type)));
  switch (f.type) {
    case FrameType::kEpochBegin:
      return CheckBegin(f);
    case FrameType::kRecord:
      return CheckRecord(f);
    case FrameType::kEpochEnd:
      return CheckEnd(f);
    default:
      return DataLoss(fmt::format("unexpected {} frame inside an epoch", FrameTypeName(f.type)));
  }
}

StatusOr<EpochVerifier::Step> EpochVerifier::CheckBegin(const Frame& f) {
  if (begun_) return DataLoss("second EpochBegin inside an epoch");
  pb::EpochBegin b;
  RETURN_IF_ERROR(Parse(f, b));
  if (!f.payload.empty()) return DataLoss("EpochBegin frame carries a payload");
  if (b.volume() != volume_) {
    return DataLoss(
        fmt::format("epoch of volume '{}' on the stream of volume '{}'", b.volume(), volume_));
  }
  if (b.base_seq() != base_seq_) {
    return FailedPrecondition(
        fmt::format("epoch {} builds on restore point {}, but the newest restore point here is {}",
                    b.seq(), b.base_seq(), base_seq_));
  }
  if (b.seq() <= b.base_seq()) {
    return DataLoss(fmt::format("epoch {} does not follow its base {}", b.seq(), b.base_seq()));
  }
  if (b.group().empty() != (b.group_members() == 0)) {
    return DataLoss(fmt::format("epoch {} names group '{}' of {} members", b.seq(), b.group(),
                                b.group_members()));
  }
  if (b.max_block() == 0 || b.max_block() > kMaxPayload) {
    return DataLoss(fmt::format("epoch {} announces blocks of {} bytes", b.seq(), b.max_block()));
  }
  begun_ = true;
  summary_ = EpochSummary{};
  summary_.id = EpochId{.volume = b.volume(),
                        .seq = b.seq(),
                        .base_seq = b.base_seq(),
                        .image_size = b.image_size(),
                        .snap_time_ns = b.snap_time_ns(),
                        .source_site = b.source_site(),
                        .group = b.group(),
                        .group_members = b.group_members()};
  summary_.prev_chain = prev_chain_;
  summary_.max_block = b.max_block();
  summary_.resume_from = b.resume_from();
  hasher_ = std::make_unique<EpochHasher>(b.seq(), b.image_size());
  return Step::kBegin;
}

StatusOr<EpochVerifier::Step> EpochVerifier::CheckRecord(const Frame& f) {
  if (!begun_) return DataLoss("Record frame before EpochBegin");
  pb::Record r;
  RETURN_IF_ERROR(Parse(f, r));
  RETURN_IF_ERROR(CheckRecordPlace(r, summary_, next_index_, next_offset_));
  ASSIGN_OR_RETURN(const CheckedPayload payload, CheckPayload(r, f, summary_.max_block));
  hasher_->Add(r.offset(), r.length(), payload.kind, payload.hash);
  (payload.kind == RecordKind::kData ? summary_.data_bytes : summary_.zero_bytes) += r.length();
  record_ = VerifiedRecord{r.index(), r.offset(), r.length(), payload.kind};
  ++next_index_;
  next_offset_ = r.offset() + r.length();
  summary_.records = next_index_;
  return Step::kRecord;
}

StatusOr<EpochVerifier::Step> EpochVerifier::CheckEnd(const Frame& f) {
  if (!begun_) return DataLoss("EpochEnd frame before EpochBegin");
  pb::EpochEnd e;
  RETURN_IF_ERROR(Parse(f, e));
  if (e.seq() != summary_.id.seq) {
    return DataLoss(fmt::format("end of epoch {} inside epoch {}", e.seq(), summary_.id.seq));
  }
  if (e.records() != summary_.records || e.data_bytes() != summary_.data_bytes ||
      e.zero_bytes() != summary_.zero_bytes) {
    return DataLoss(
        fmt::format("epoch {} end says {} records ({} data, {} zero bytes) but {} ({}, {}) arrived",
                    e.seq(), e.records(), e.data_bytes(), e.zero_bytes(), summary_.records,
                    summary_.data_bytes, summary_.zero_bytes));
  }
  EpochDigest digest;
  ChainDigest prev, chain;
  if (!EpochDigest::FromString(e.epoch_digest(), &digest) ||
      !ChainDigest::FromString(e.prev_chain(), &prev) ||
      !ChainDigest::FromString(e.chain_digest(), &chain)) {
    return DataLoss(fmt::format("epoch {} end has a malformed digest", e.seq()));
  }
  summary_.epoch_digest = hasher_->Finish();
  if (digest != summary_.epoch_digest) {
    return DataLoss(fmt::format("epoch {} digest mismatch: sent {}, computed {}", e.seq(),
                                digest.ToHex(), summary_.epoch_digest.ToHex()));
  }
  if (prev != prev_chain_) {
    return FailedPrecondition(
        fmt::format("epoch {} chains from {}, but restore point {} here has chain {}", e.seq(),
                    prev.ToHex(), base_seq_, prev_chain_.ToHex()));
  }
  summary_.chain = NextChain(prev_chain_, summary_.epoch_digest, summary_.id.seq);
  if (chain != summary_.chain) {
    return DataLoss(fmt::format("epoch {} chain digest mismatch", e.seq()));
  }
  done_ = true;
  return Step::kEnd;
}

}  // namespace cairn
