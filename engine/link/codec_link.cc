#include "engine/link/codec_link.h"

#include <fmt/format.h>
#include <lz4.h>
#include <zstd.h>

#include <cstring>
#include <utility>

namespace cairn {
namespace {

// zstd's fastest level: the link's codec must keep up with a core's share
// of a full sync.
constexpr int kZstdLevel = 1;

void PutPrefix(Compression c, uint32_t raw_len, char* out) {
  std::memset(out, 0, kCompressedPrefix);
  out[0] = static_cast<char>(c);
  for (int i = 0; i < 4; ++i) out[4 + i] = static_cast<char>((raw_len >> (8 * i)) & 0xff);
}

uint32_t GetLength(const char* prefix) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{static_cast<unsigned char>(prefix[4 + i])} << (8 * i);
  return v;
}

}  // namespace

std::optional<Compression> ParseCompression(std::string_view name) {
  if (name == "none") return Compression::kNone;
  if (name == "lz4") return Compression::kLz4;
  if (name == "zstd") return Compression::kZstd;
  return std::nullopt;
}

std::string_view CompressionName(Compression c) {
  switch (c) {
    case Compression::kNone:
      return "none";
    case Compression::kLz4:
      return "lz4";
    case Compression::kZstd:
      return "zstd";
  }
  return "unknown";
}

std::optional<Payload> CompressPayload(Compression c, std::span<const char> raw) {
  const size_t most = raw.size() - raw.size() / 8;  // what saves less is not worth it
  const size_t bound = c == Compression::kLz4 ? LZ4_compressBound(static_cast<int>(raw.size()))
                                              : ZSTD_compressBound(raw.size());
  Payload out(kCompressedPrefix + bound);
  char* dst = out.data() + kCompressedPrefix;
  size_t n = 0;
  if (c == Compression::kLz4) {
    const int r = LZ4_compress_default(raw.data(), dst, static_cast<int>(raw.size()),
                                       static_cast<int>(bound));
    if (r <= 0) return std::nullopt;
    n = static_cast<size_t>(r);
  } else {
    const size_t r = ZSTD_compress(dst, bound, raw.data(), raw.size(), kZstdLevel);
    if (ZSTD_isError(r)) return std::nullopt;
    n = r;
  }
  if (n > most) return std::nullopt;
  PutPrefix(c, static_cast<uint32_t>(raw.size()), out.data());
  out.resize(kCompressedPrefix + n);
  return out;
}

StatusOr<Payload> DecompressPayload(std::span<const char> wire) {
  if (wire.size() < kCompressedPrefix) {
    return DataLoss(
        fmt::format("compressed record: {} bytes, shorter than its prefix", wire.size()));
  }
  const auto codec = static_cast<Compression>(static_cast<unsigned char>(wire[0]));
  const uint32_t len = GetLength(wire.data());
  if (codec != Compression::kLz4 && codec != Compression::kZstd) {
    return DataLoss(fmt::format("compressed record: unknown codec {}",
                                static_cast<int>(static_cast<unsigned char>(wire[0]))));
  }
  if (len > kMaxPayload) {
    return DataLoss(
        fmt::format("compressed record: length {} over the limit of {}", len, kMaxPayload));
  }
  Payload out(len);
  const char* src = wire.data() + kCompressedPrefix;
  const size_t n = wire.size() - kCompressedPrefix;
  bool whole = false;
  if (codec == Compression::kLz4) {
    const int r = LZ4_decompress_safe(src, out.data(), static_cast<int>(n), static_cast<int>(len));
    whole = r >= 0 && static_cast<uint32_t>(r) == len;
  } else {
    const size_t r = ZSTD_decompress(out.data(), len, src, n);
    whole = !ZSTD_isError(r) && r == len;
  }
  if (!whole) {
    return DataLoss(
        fmt::format("compressed record: its {} bytes do not decode ({}) to the {} "
                    "bytes its prefix gives",
                    n, CompressionName(codec), len));
  }
  return out;
}

CodecLink::CodecLink(std::unique_ptr<Link> inner, Compression send,
                     std::atomic<uint64_t>* wire_bytes)
    : owned_(std::move(inner)), inner_(*owned_), send_(send), wire_counter_(wire_bytes) {}

CodecLink::CodecLink(Link& inner, Compression send) : inner_(inner), send_(send) {}

Status CodecLink::Send(FrameType type, std::string_view body, std::span<const char> payload) {
  if (type != FrameType::kRecord) return inner_.Send(type, body, payload);
  record_bytes_ += payload.size();
  if (send_ != Compression::kNone && payload.size() >= kMinCompressedPayload) {
    if (std::optional<Payload> packed = CompressPayload(send_, payload)) {
      Count(packed->size());
      return inner_.Send(FrameType::kCompressedRecord, body, *packed);
    }
  }
  Count(payload.size());
  return inner_.Send(type, body, payload);
}

void CodecLink::Count(size_t wire) {
  wire_bytes_ += wire;
  if (wire_counter_ != nullptr) wire_counter_->fetch_add(wire, std::memory_order_relaxed);
}

StatusOr<Frame> CodecLink::Receive(std::chrono::milliseconds timeout) {
  ASSIGN_OR_RETURN(Frame f, inner_.Receive(timeout));
  if (f.type != FrameType::kCompressedRecord) return f;
  StatusOr<Payload> raw = DecompressPayload(f.payload);
  if (!raw.ok()) return raw.status().Annotate("from " + inner_.peer());
  f.type = FrameType::kRecord;
  f.payload = std::move(raw).value();
  return f;
}

}  // namespace cairn
