#include "engine/base/checksum.h"

#include <fmt/format.h>

#include <bit>

namespace cairn {
namespace {

static_assert(std::endian::native == std::endian::little,
              "the wire and spool formats are little-endian; port LoadLE/StoreLE first");

void PutLE64(uint8_t* p, uint64_t v) { std::memcpy(p, &v, 8); }

}  // namespace

std::string BlockHash::ToHex() const { return fmt::format("{:016x}", v_); }

EpochHasher::EpochHasher(uint64_t seq, uint64_t image_size) : state_(XXH3_createState()) {
  XXH3_128bits_reset(state_);
  uint8_t head[16];
  PutLE64(head, seq);
  PutLE64(head + 8, image_size);
  XXH3_128bits_update(state_, head, sizeof head);
}

EpochHasher::~EpochHasher() { XXH3_freeState(state_); }

void EpochHasher::Add(uint64_t offset, uint64_t length, RecordKind kind, BlockHash h) {
  uint8_t rec[25];
  PutLE64(rec, offset);
  PutLE64(rec + 8, length);
  rec[16] = static_cast<uint8_t>(kind);
  PutLE64(rec + 17, h.value());
  XXH3_128bits_update(state_, rec, sizeof rec);
}

EpochDigest EpochHasher::Finish() const {
  return EpochDigest::FromXxh(XXH3_128bits_digest(state_));
}

ChainDigest NextChain(const ChainDigest& prev, const EpochDigest& epoch, uint64_t seq) {
  uint8_t buf[40];
  std::memcpy(buf, prev.bytes().data(), 16);
  std::memcpy(buf + 16, epoch.bytes().data(), 16);
  PutLE64(buf + 32, seq);
  return ChainDigest::FromXxh(XXH3_128bits(buf, sizeof buf));
}

}  // namespace cairn
