#include "engine/spool/spool_file.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstring>

namespace cairn::spool_internal {

std::string DirOf(const std::filesystem::path& path) {
  const std::filesystem::path dir = path.parent_path();
  return dir.empty() ? std::string(".") : dir.string();
}

Status SpoolErrno(int err, std::string_view what) {
  switch (err) {
    case ENOSPC:
    case EDQUOT:
      return ResourceExhausted(
                 fmt::format("spool disk full: {}: {} (errno {})", what, std::strerror(err), err))
          .WithReason(Reason::kSpoolDiskFull);
    case EFBIG:  // the file system's largest file, or RLIMIT_FSIZE
      return ResourceExhausted(
          fmt::format("spool file too large: {}: {} (errno {})", what, std::strerror(err), err));
    case EACCES:
    case EPERM:
    case EROFS:
      return FailedPrecondition(fmt::format("{}: {} (errno {})", what, std::strerror(err), err));
    default:
      return ErrnoStatus(-err, what);
  }
}

void EncodeSpoolHeader(const SpoolIdentity& id, char* block) {
  assert(id.volume.size() <= kMaxVolumeName);
  std::memset(block, 0, kSpoolHeaderSize);
  const size_t header_len = kMinHeaderLen + id.volume.size();
  std::memcpy(block + kMagicOff, kSpoolMagic, sizeof kSpoolMagic);
  PutLE<uint32_t>(block + kVersionOff, kSpoolVersion);
  PutLE<uint32_t>(block + kHeaderLenOff, static_cast<uint32_t>(header_len));
  PutLE<uint64_t>(block + kSeqOff, id.seq);
  PutLE<uint16_t>(block + kVolumeLenOff, static_cast<uint16_t>(id.volume.size()));
  std::memcpy(block + kVolumeOff, id.volume.data(), id.volume.size());
  const size_t sum_off = header_len - kChecksumBytes;
  PutLE<uint64_t>(block + sum_off, XXH3_64bits(block, sum_off));
}

StatusOr<SpoolIdentity> DecodeSpoolHeader(const char* block, size_t n,
                                          const std::filesystem::path& path) {
  if (n < sizeof kSpoolMagic ||
      std::memcmp(block + kMagicOff, kSpoolMagic, sizeof kSpoolMagic) != 0) {
    return DataLoss(fmt::format("not a Cairn spool file: {}", path.string()));
  }
  if (n < kSpoolHeaderSize) {
    return DataLoss(fmt::format("spool header truncated: {} of {} bytes", n, kSpoolHeaderSize));
  }
  const uint32_t header_len = GetLE<uint32_t>(block + kHeaderLenOff);
  if (header_len < kMinHeaderLen || header_len > kSpoolHeaderSize) {
    return DataLoss("spool header checksum mismatch");  // the length itself is corrupt
  }
  const size_t sum_off = header_len - kChecksumBytes;
  if (XXH3_64bits(block, sum_off) != GetLE<uint64_t>(block + sum_off)) {
    return DataLoss("spool header checksum mismatch");
  }
  const uint32_t version = GetLE<uint32_t>(block + kVersionOff);
  if (version != kSpoolVersion) {
    return FailedPrecondition(
        fmt::format("unsupported spool version {} (this build reads {})", version, kSpoolVersion));
  }
  const size_t volume_len = GetLE<uint16_t>(block + kVolumeLenOff);
  if (volume_len > kMaxVolumeName || kMinHeaderLen + volume_len != header_len) {
    // The checksum matched, so the writer produced this: a bug, not a bad disk.
    return Internal(fmt::format("spool header inconsistent: volume_len {}, header_len {}",
                                volume_len, header_len));
  }
  SpoolIdentity id;
  id.volume.assign(block + kVolumeOff, volume_len);
  id.seq = GetLE<uint64_t>(block + kSeqOff);
  return id;
}

StatusOr<size_t> PreadFull(int fd, char* out, size_t n, uint64_t off,
                           const std::filesystem::path& path) {
  size_t got = 0;
  while (got < n) {
    const ssize_t r = ::pread(fd, out + got, n - got, static_cast<off_t>(off + got));
    if (r < 0) {
      if (errno == EINTR) continue;
      return SpoolErrno(errno,
                        fmt::format("reading spool {} at offset {}", path.string(), off + got));
    }
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  return got;
}

}  // namespace cairn::spool_internal

namespace cairn::spool_internal {

Status CheckCreateArgs(const SpoolIdentity& id, const SpoolOptions& options) {
  if (options.buffer_bytes < kAlign || options.buffer_bytes % kAlign != 0 ||
      options.buffer_bytes > kMaxBufferBytes) {
    return InvalidArgument(
        fmt::format("spool buffer_bytes must be a multiple of {} between {} and {}, got {}", kAlign,
                    kAlign, kMaxBufferBytes, options.buffer_bytes));
  }
  if (id.volume.size() > kMaxVolumeName) {
    return InvalidArgument(fmt::format("spool volume name too long: {} bytes (max {})",
                                       id.volume.size(), kMaxVolumeName));
  }
  return OkStatus();
}

Status CheckResumeArgs(const SpoolOptions& options) {
  if (options.buffer_bytes < kAlign || options.buffer_bytes % kAlign != 0 ||
      options.buffer_bytes > kMaxBufferBytes) {
    return InvalidArgument(fmt::format("spool buffer_bytes must be a multiple of {}", kAlign));
  }
  return OkStatus();
}

Status CheckSpoolQuota(const std::filesystem::path& path, uint64_t appended, uint64_t frame_bytes,
                       uint64_t max_bytes) {
  if (max_bytes == 0) return OkStatus();
  // What the file will take once this frame is synced (padded to a block).
  const uint64_t grows_to = RoundUp(kSpoolHeaderSize + appended + frame_bytes, kAlign);
  if (grows_to <= max_bytes) return OkStatus();
  return ResourceExhausted(fmt::format("spool quota exceeded: spool {} would grow to {} bytes, "
                                       "over the limit of {} bytes",
                                       path.string(), grows_to, max_bytes))
      .WithReason(Reason::kSpoolQuota);
}

}  // namespace cairn::spool_internal
