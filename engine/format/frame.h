// Frame: the unit of Cairn's changed-block journal, on the wire and in the
// spool. A frame is a fixed 32-byte header, a protobuf body (proto/), and a
// raw payload (block bytes; never inside protobuf). docs/FORMAT.md gives
// the layout byte by byte.
//
//   off size field
//     0    4 magic        "CARN"
//     4    2 version      kFrameVersion
//     6    2 type         FrameType
//     8    4 body_len     <= kMaxBody
//    12    4 payload_len  <= kMaxPayload
//    16    8 body_xxh3    XXH3-64 of the body bytes
//    24    8 header_xxh3  XXH3-64 of bytes 0..23
//
// The payload is covered by the XXH3-64 carried inside the body (a data
// Record's xxh3), so each layer is checked by the layer that knows it.
//
// Thread-safety: free functions on values; ByteSource implementations say
// their own.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "engine/base/status.h"
#include "engine/format/payload_cache.h"

namespace cairn {

inline constexpr uint32_t kFrameMagic = 0x4E524143;  // "CARN" little-endian
inline constexpr uint16_t kFrameVersion = 1;
inline constexpr size_t kFrameHeaderSize = 32;
inline constexpr uint32_t kMaxBody = 1u << 20;
inline constexpr uint32_t kMaxPayload = 8u << 20;

enum class FrameType : uint16_t {
  kEpochBegin = 1,
  kRecord = 2,
  kEpochEnd = 3,
  // A kRecord whose payload is compressed (engine/link/codec_link.h); on the
  // wire only, never in a spool.
  kCompressedRecord = 4,
  kHello = 10,
  kHelloReply = 11,
  kEpochAck = 12,
  kLinkError = 13,
  kUnchanged = 14,
  kDigestRequest = 15,
  kDigestReply = 16,
  kVerifyEnd = 17,
  kControlRequest = 20,
  kControlReply = 21,
};

std::string_view FrameTypeName(FrameType t);

struct FrameHeader {
  FrameType type;
  uint32_t body_len;
  uint32_t payload_len;
  uint64_t body_xxh3;
};

// The allocator of payloads: new elements are left default-initialized
// (a vector of char then grows without zeroing what is about to be
// overwritten, up to 8 MiB a frame), and large buffers come from and go
// back to the PayloadCache (payload_cache.h) rather than the system.
template <typename T>
struct PayloadAllocator {
  using value_type = T;
  PayloadAllocator() noexcept = default;
  template <typename U>
  PayloadAllocator(const PayloadAllocator<U>&) noexcept {}
  T* allocate(size_t n) {
    const size_t bytes = n * sizeof(T);
    if (bytes >= payload_cache::kMinBytes) return static_cast<T*>(payload_cache::Take(bytes));
    return std::allocator<T>().allocate(n);
  }
  void deallocate(T* p, size_t n) noexcept {
    const size_t bytes = n * sizeof(T);
    if (bytes >= payload_cache::kMinBytes) {
      payload_cache::Give(p, bytes);
      return;
    }
    std::allocator<T>().deallocate(p, n);
  }
  template <typename U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const PayloadAllocator<U>&) const noexcept {
    return true;
  }
};

// A frame's payload bytes.
using Payload = std::vector<char, PayloadAllocator<char>>;

// A decoded frame that owns its bytes. The body is verified against
// body_xxh3; the payload is NOT verified here (its hash is in the body).
struct Frame {
  FrameType type{};
  std::string body;
  Payload payload;
};

// Encodes the 32-byte header for `body` and a payload of `payload_len` bytes.
// REQUIRES: body.size() <= kMaxBody, payload_len <= kMaxPayload.
std::array<char, kFrameHeaderSize> EncodeHeader(FrameType type, std::string_view body,
                                                uint32_t payload_len);

// Decodes and checks a header. Errors (all kDataLoss, exact texts):
//   "bad frame magic 0x..."            not a Cairn frame (or zero padding)
//   "unsupported frame version N"      a peer or spool of another version
//   "frame header checksum mismatch"   any flipped bit in bytes 0..31
//   "frame body too large: N bytes" / "frame payload too large: N bytes"
// Version mismatch is kFailedPrecondition: no retry will fix it.
StatusOr<FrameHeader> DecodeHeader(std::span<const char, kFrameHeaderSize> bytes);

// Returns kDataLoss "frame body checksum mismatch" unless body hashes to
// h.body_xxh3.
Status VerifyBody(const FrameHeader& h, std::string_view body);

// The whole frame as one contiguous byte string (header, body, payload).
// For tests, the in-process link and small control messages.
std::string EncodeFrame(FrameType type, std::string_view body, std::span<const char> payload = {});

// A source of bytes that frames are read from (socket, file, memory).
class ByteSource {
 public:
  virtual ~ByteSource() = default;
  // Fills all of `out`, or fails. kAborted "end of stream" on a clean EOF
  // before the first byte; kDataLoss "truncated ..." on EOF mid-way.
  virtual Status ReadExact(std::span<char> out) = 0;
};

// Reads one frame: header, body (verified), payload (not verified).
StatusOr<Frame> ReadFrame(ByteSource& src);

// Reads frames from a byte string (tests, the in-process link).
class StringSource final : public ByteSource {
 public:
  explicit StringSource(std::string_view s) : s_(s) {}
  Status ReadExact(std::span<char> out) override;
  size_t consumed() const { return pos_; }

 private:
  std::string_view s_;
  size_t pos_ = 0;
};

}  // namespace cairn
