// Checksums as strong types: they compare and print, nothing more.
//
// BlockHash  XXH3-64 of one data block's bytes (computed at the source,
//            checked at the sink on receipt and again before apply).
// EpochDigest XXH3-128 over the ordered record descriptors of one epoch.
// ChainDigest XXH3-128 linking an epoch to all epochs before it, so a
//            restore point proves the whole history that led to it.
//
// Thread-safety: values; EpochHasher is not thread-safe (one per epoch).
#pragma once

#include <xxhash.h>

#include <array>
#include <compare>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
// Debian's libxxhash carries a run-time dispatcher on x86-64: the same
// XXH3, through AVX2 or AVX-512 where the CPU has them (twice the SSE2
// build's speed on a 1 MiB block). Only the block hash takes this path;
// it is the one that sees every byte.
#if defined(__x86_64__) && __has_include(<xxh_x86dispatch.h>)
#define XXH_DISPATCH_DISABLE_REPLACE 1
#include <xxh_x86dispatch.h>
#define CAIRN_XXH3_64 XXH3_64bits_dispatch
#else
#define CAIRN_XXH3_64 XXH3_64bits
#endif

namespace cairn {

class BlockHash {
 public:
  constexpr BlockHash() = default;
  constexpr explicit BlockHash(uint64_t v) : v_(v) {}
  static BlockHash Of(std::span<const char> bytes) {
    return BlockHash(CAIRN_XXH3_64(bytes.data(), bytes.size()));
  }
  constexpr uint64_t value() const { return v_; }
  friend constexpr bool operator==(BlockHash, BlockHash) = default;
  std::string ToHex() const;

 private:
  uint64_t v_ = 0;
};

// 128-bit digest, stored as 16 bytes in canonical (big-endian) order so that
// the bytes on the wire and on disk are the same on every host.
template <typename Tag>
class Digest128 {
 public:
  static constexpr size_t kSize = 16;
  constexpr Digest128() = default;
  static Digest128 FromBytes(std::span<const uint8_t, kSize> b) {
    Digest128 d;
    std::memcpy(d.b_.data(), b.data(), kSize);
    return d;
  }
  // Returns false (and leaves *out alone) unless `s` holds exactly 16 bytes.
  static bool FromString(const std::string& s, Digest128* out) {
    if (s.size() != kSize) return false;
    std::memcpy(out->b_.data(), s.data(), kSize);
    return true;
  }
  static Digest128 FromXxh(XXH128_hash_t h) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, h);
    Digest128 d;
    std::memcpy(d.b_.data(), c.digest, kSize);
    return d;
  }
  std::string AsBytes() const {
    return std::string(reinterpret_cast<const char*>(b_.data()), kSize);
  }
  const std::array<uint8_t, kSize>& bytes() const { return b_; }
  bool IsZero() const { return *this == Digest128(); }
  friend bool operator==(const Digest128&, const Digest128&) = default;
  std::string ToHex() const {
    static const char* k = "0123456789abcdef";
    std::string s;
    for (uint8_t x : b_) {
      s.push_back(k[x >> 4]);
      s.push_back(k[x & 15]);
    }
    return s;
  }

 private:
  std::array<uint8_t, kSize> b_{};
};

struct EpochDigestTag {};
struct ChainDigestTag {};
using EpochDigest = Digest128<EpochDigestTag>;
using ChainDigest = Digest128<ChainDigestTag>;

enum class RecordKind : uint8_t { kData = 1, kZero = 2 };

// Streams the descriptors of an epoch's records, in order, into XXH3-128.
// The epoch digest covers: image size, then for each record its offset,
// length, kind and block hash (0 for zero records), all little-endian.
// Data bytes enter through their block hash, so the digest is cheap and
// still binds every byte.
class EpochHasher {
 public:
  explicit EpochHasher(uint64_t seq, uint64_t image_size);
  ~EpochHasher();
  EpochHasher(const EpochHasher&) = delete;
  EpochHasher& operator=(const EpochHasher&) = delete;

  void Add(uint64_t offset, uint64_t length, RecordKind kind, BlockHash h);
  EpochDigest Finish() const;

 private:
  XXH3_state_t* state_;
};

// chain(N) = XXH3-128(chain(N-1) || epoch_digest(N) || seq(N) little-endian).
// chain(0) is all zeros: the empty history.
ChainDigest NextChain(const ChainDigest& prev, const EpochDigest& epoch, uint64_t seq);

}  // namespace cairn
