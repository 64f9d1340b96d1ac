// CodecLink: the layer of the Link seam (link.h) that compresses data
// records on the wire, for links between sites whose bandwidth costs more
// than a core's time. It stacks on any Link.
//
// A data record (FrameType::kRecord) it sends with a codec on leaves as a
// kCompressedRecord frame: the same body, and as payload an 8-byte prefix
// (the codec, 3 zero bytes, the record's length as u32 little-endian)
// followed by the compressed bytes. A payload that would not shrink by an
// eighth leaves as it is. Received kCompressedRecord frames are decoded
// back into kRecord frames, whatever codec the peer chose, so the layers
// above see the same frames either way; the record's XXH3 in its body
// still covers the bytes as they were read at the source, and the epoch's
// verifier checks it after decoding.
//
// A source compresses only for a sink that said it takes compressed
// records (HelloReply.takes_compressed): an older sink would refuse them.
//
// Memory: nothing is kept between frames; each compressed payload is a
// Payload (PayloadCache) that lives for one Send or Receive.
//
// Thread-safety: as link.h.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/base/status.h"
#include "engine/link/link.h"

namespace cairn {

enum class Compression : uint8_t { kNone = 0, kLz4 = 1, kZstd = 2 };

// "none", "lz4", "zstd" (the config's spelling); nullopt for anything else.
std::optional<Compression> ParseCompression(std::string_view name);
std::string_view CompressionName(Compression c);

// Payloads shorter than this leave as they are (a 4 KiB block is the
// smallest a record carries in practice).
inline constexpr size_t kMinCompressedPayload = 4096;
inline constexpr size_t kCompressedPrefix = 8;

// The wire form of `raw` under `c` (prefix + compressed bytes), or nullopt
// when it would not be at least an eighth shorter. REQUIRES: c != kNone,
// raw.size() <= kMaxPayload.
std::optional<Payload> CompressPayload(Compression c, std::span<const char> raw);

// The bytes a compressed record's payload carries. kDataLoss, naming what is
// wrong, for an unknown codec, a length over kMaxPayload, or bytes that do
// not decode to exactly the length the prefix gives.
StatusOr<Payload> DecompressPayload(std::span<const char> wire);

class CodecLink final : public Link {
 public:
  // Owns `inner`; compresses data records with `send` (kNone: sends them
  // as they are, and only decodes). `wire_bytes`, if given, counts the
  // payload bytes of the data records sent, as they went on the wire.
  CodecLink(std::unique_ptr<Link> inner, Compression send,
            std::atomic<uint64_t>* wire_bytes = nullptr);
  // Borrows `inner`, which must outlive this layer.
  CodecLink(Link& inner, Compression send);

  Status Send(FrameType type, std::string_view body, std::span<const char> payload) override;
  Status SendEncoded(std::string_view frame) override { return inner_.SendEncoded(frame); }
  StatusOr<Frame> Receive(std::chrono::milliseconds timeout) override;
  void Close() override { inner_.Close(); }
  const std::string& peer() const override { return inner_.peer(); }
  Status Handshake() override { return inner_.Handshake(); }
  const std::vector<std::string>& peer_names() const override { return inner_.peer_names(); }
  std::optional<PeerCredentials> credentials() const override { return inner_.credentials(); }

  // Payload bytes of data records handed to Send, and what went on the wire
  // for them (equal with kNone).
  uint64_t record_bytes() const { return record_bytes_; }
  uint64_t wire_bytes() const { return wire_bytes_; }

 private:
  void Count(size_t wire);

  std::unique_ptr<Link> owned_;
  Link& inner_;
  const Compression send_;
  std::atomic<uint64_t>* const wire_counter_ = nullptr;
  uint64_t record_bytes_ = 0;
  uint64_t wire_bytes_ = 0;
};

}  // namespace cairn
