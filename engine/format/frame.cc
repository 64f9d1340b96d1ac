#include "engine/format/frame.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <cstring>

namespace cairn {
namespace {

struct WireHeader {
  uint32_t magic;
  uint16_t version;
  uint16_t type;
  uint32_t body_len;
  uint32_t payload_len;
  uint64_t body_xxh3;
  uint64_t header_xxh3;
};
static_assert(sizeof(WireHeader) == kFrameHeaderSize, "frame header layout is part of the format");
static_assert(offsetof(WireHeader, header_xxh3) == 24, "header checksum covers bytes 0..23");

}  // namespace

std::string_view FrameTypeName(FrameType t) {
  switch (t) {
    case FrameType::kEpochBegin:
      return "EpochBegin";
    case FrameType::kRecord:
      return "Record";
    case FrameType::kEpochEnd:
      return "EpochEnd";
    case FrameType::kCompressedRecord:
      return "CompressedRecord";
    case FrameType::kHello:
      return "Hello";
    case FrameType::kHelloReply:
      return "HelloReply";
    case FrameType::kEpochAck:
      return "EpochAck";
    case FrameType::kLinkError:
      return "LinkError";
    case FrameType::kUnchanged:
      return "Unchanged";
    case FrameType::kDigestRequest:
      return "DigestRequest";
    case FrameType::kDigestReply:
      return "DigestReply";
    case FrameType::kVerifyEnd:
      return "VerifyEnd";
    case FrameType::kControlRequest:
      return "ControlRequest";
    case FrameType::kControlReply:
      return "ControlReply";
  }
  return "Unknown";
}

std::array<char, kFrameHeaderSize> EncodeHeader(FrameType type, std::string_view body,
                                                uint32_t payload_len) {
  assert(body.size() <= kMaxBody);
  assert(payload_len <= kMaxPayload);
  WireHeader h{};
  h.magic = kFrameMagic;
  h.version = kFrameVersion;
  h.type = static_cast<uint16_t>(type);
  h.body_len = static_cast<uint32_t>(body.size());
  h.payload_len = payload_len;
  h.body_xxh3 = XXH3_64bits(body.data(), body.size());
  h.header_xxh3 = XXH3_64bits(&h, offsetof(WireHeader, header_xxh3));
  std::array<char, kFrameHeaderSize> out;
  std::memcpy(out.data(), &h, sizeof h);
  return out;
}

StatusOr<FrameHeader> DecodeHeader(std::span<const char, kFrameHeaderSize> bytes) {
  WireHeader h;
  std::memcpy(&h, bytes.data(), sizeof h);
  if (h.magic != kFrameMagic) return DataLoss(fmt::format("bad frame magic {:#010x}", h.magic));
  // The checksum is checked before any other field is trusted, so a flipped
  // bit in the version or a length reads as corruption, not as a peer of
  // another version.
  if (XXH3_64bits(&h, offsetof(WireHeader, header_xxh3)) != h.header_xxh3) {
    return DataLoss("frame header checksum mismatch");
  }
  if (h.version != kFrameVersion) {
    return FailedPrecondition(
        fmt::format("unsupported frame version {} (this build speaks {}): upgrade the older side",
                    h.version, kFrameVersion));
  }
  if (h.body_len > kMaxBody)
    return DataLoss(fmt::format("frame body too large: {} bytes", h.body_len));
  if (h.payload_len > kMaxPayload) {
    return DataLoss(fmt::format("frame payload too large: {} bytes", h.payload_len));
  }
  return FrameHeader{static_cast<FrameType>(h.type), h.body_len, h.payload_len, h.body_xxh3};
}

Status VerifyBody(const FrameHeader& h, std::string_view body) {
  if (XXH3_64bits(body.data(), body.size()) != h.body_xxh3) {
    return DataLoss(fmt::format("frame body checksum mismatch ({} frame)", FrameTypeName(h.type)));
  }
  return OkStatus();
}

std::string EncodeFrame(FrameType type, std::string_view body, std::span<const char> payload) {
  auto hdr = EncodeHeader(type, body, static_cast<uint32_t>(payload.size()));
  std::string out;
  out.reserve(hdr.size() + body.size() + payload.size());
  out.append(hdr.data(), hdr.size());
  out.append(body);
  out.append(payload.data(), payload.size());
  return out;
}

StatusOr<Frame> ReadFrame(ByteSource& src) {
  std::array<char, kFrameHeaderSize> hb;
  RETURN_IF_ERROR(src.ReadExact(hb));
  ASSIGN_OR_RETURN(FrameHeader h, DecodeHeader(hb));
  Frame f;
  f.type = h.type;
  f.body.resize(h.body_len);
  Status st = src.ReadExact(std::span<char>(f.body.data(), f.body.size()));
  if (!st.ok()) {
    return st.code() == Code::kAborted ? DataLoss("truncated frame: body missing") : st;
  }
  RETURN_IF_ERROR(VerifyBody(h, f.body));
  f.payload.resize(h.payload_len);
  st = src.ReadExact(f.payload);
  if (!st.ok()) {
    return st.code() == Code::kAborted ? DataLoss("truncated frame: payload missing") : st;
  }
  return f;
}

Status StringSource::ReadExact(std::span<char> out) {
  if (out.empty()) return OkStatus();
  if (pos_ == s_.size()) return Aborted("end of stream");
  if (s_.size() - pos_ < out.size()) {
    const size_t left = s_.size() - pos_;
    pos_ = s_.size();
    return DataLoss(fmt::format("truncated frame: wanted {} bytes, {} left", out.size(), left));
  }
  std::memcpy(out.data(), s_.data() + pos_, out.size());
  pos_ += out.size();
  return OkStatus();
}

}  // namespace cairn
