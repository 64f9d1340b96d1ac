// The spool file's layout and the helpers its writer and reader share (not
// for use outside engine/spool/).
//
// Spool header, block 0 of the file (all integers little-endian):
//
//   off  size  field
//     0     8  magic        "CAIRNSPL"
//     8     4  version      kSpoolVersion
//    12     4  header_len   bytes covered by the header, checksum included
//                           (34 + volume_len for version 1)
//    16     8  seq          epoch sequence number
//    24     2  volume_len   <= 256
//    26     n  volume       volume name bytes (not NUL-terminated)
//  26+n     8  header_xxh3  XXH3-64 of bytes [0, 26+n)
//  34+n   ...  zeros up to 4096
//
// The first 16 bytes and the rule "the checksum is the last 8 bytes of
// header_len" hold for every version, so a reader checks the checksum
// before it trusts the version: a flipped bit in the version reads as
// corruption, not as a file of another version.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "engine/base/status.h"
#include "engine/spool/spool.h"

namespace cairn::spool_internal {

// O_DIRECT alignment of buffers, offsets and lengths. 4 KiB covers devices
// with 512-byte and 4 KiB logical blocks.
inline constexpr size_t kAlign = 4096;
inline constexpr unsigned kRingDepth = 8;
// Staging buffers of a writer (SpoolOptions::buffer_bytes each). Four
// (three writes in flight) did not receive a full sync any faster than
// two on a disk that writes 1.7 GiB/s: the copy into them is the cost.
inline constexpr int kBuffers = 2;
static_assert(kBuffers + 1 <= static_cast<int>(kRingDepth));
// io_uring registers at most 1 GiB per buffer, and a write length is 32 bits.
inline constexpr size_t kMaxBufferBytes = size_t{1} << 30;
inline constexpr size_t kReadBufferBytes = size_t{1} << 20;

inline constexpr char kSpoolMagic[8] = {'C', 'A', 'I', 'R', 'N', 'S', 'P', 'L'};
inline constexpr size_t kMagicOff = 0;
inline constexpr size_t kVersionOff = 8;
inline constexpr size_t kHeaderLenOff = 12;
inline constexpr size_t kSeqOff = 16;
inline constexpr size_t kVolumeLenOff = 24;
inline constexpr size_t kVolumeOff = 26;
inline constexpr size_t kChecksumBytes = 8;
inline constexpr size_t kMaxVolumeName = 256;
inline constexpr size_t kMinHeaderLen = kVolumeOff + kChecksumBytes;
inline constexpr size_t kMaxHeaderLen = kMinHeaderLen + kMaxVolumeName;

static_assert(sizeof(kSpoolMagic) == kVersionOff - kMagicOff, "magic is 8 bytes");
static_assert(kHeaderLenOff == kVersionOff + sizeof(uint32_t));
static_assert(kSeqOff == kHeaderLenOff + sizeof(uint32_t));
static_assert(kVolumeLenOff == kSeqOff + sizeof(uint64_t));
static_assert(kVolumeOff == kVolumeLenOff + sizeof(uint16_t));
static_assert(kMinHeaderLen == 34, "fixed part of the version 1 header is 34 bytes");
static_assert(kMaxHeaderLen <= kSpoolHeaderSize, "the header fits its block");
static_assert(kMaxVolumeName <= UINT16_MAX, "volume_len is a u16");
static_assert(kSpoolHeaderSize % kAlign == 0, "frames start on an O_DIRECT boundary");
static_assert(kRingDepth >= 3, "two buffer writes and one fsync in flight");

template <typename T>
void PutLE(char* p, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

template <typename T>
T GetLE(const char* p) {
  T v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<T>(static_cast<uint8_t>(p[i])) << (8 * i);
  return v;
}

constexpr size_t RoundUp(size_t n, size_t a) { return (n + a - 1) / a * a; }

std::string DirOf(const std::filesystem::path& path);

// Errno to Status for spool files. Unlike ErrnoStatus, a full disk names
// the spool and permission errors do not point at cephx.
Status SpoolErrno(int err, std::string_view what);

// Writes the spool header into `block` (kSpoolHeaderSize bytes).
// REQUIRES: id.volume.size() <= kMaxVolumeName.
void EncodeSpoolHeader(const SpoolIdentity& id, char* block);

// Parses the first `n` bytes of a spool file (n <= kSpoolHeaderSize).
StatusOr<SpoolIdentity> DecodeSpoolHeader(const char* block, size_t n,
                                          const std::filesystem::path& path);

// Reads up to `n` bytes at `off`; fewer only at end of file.
StatusOr<size_t> PreadFull(int fd, char* out, size_t n, uint64_t off,
                           const std::filesystem::path& path);

// Reads up to `n` bytes of a spool at `off` into `out`; fewer only at its
// end. What a reader reads through: a file (pread) or memory.
using SpoolReadAt = std::function<StatusOr<size_t>(char* out, size_t n, uint64_t off)>;

// A SpoolReader over bytes in the spool file format, read through
// `read_at` (which it keeps, with whatever that owns). `path` names the
// spool in messages. Checks the header as SpoolReader::Open says.
StatusOr<std::unique_ptr<SpoolReader>> OpenSpoolBytes(SpoolReadAt read_at,
                                                      const std::filesystem::path& path,
                                                      const SpoolIdentity& expect);

// The argument checks of SpoolWriter::Create and Resume, shared by every
// SpoolStore (the same InvalidArgument texts).
Status CheckCreateArgs(const SpoolIdentity& id, const SpoolOptions& options);
Status CheckResumeArgs(const SpoolOptions& options);

// The quota check of Append: kResourceExhausted "spool quota exceeded" with
// Reason kSpoolQuota if a spool of `appended` frame bytes would pass
// `max_bytes` (0: no limit) once `frame_bytes` more are synced.
Status CheckSpoolQuota(const std::filesystem::path& path, uint64_t appended, uint64_t frame_bytes,
                       uint64_t max_bytes);

}  // namespace cairn::spool_internal
