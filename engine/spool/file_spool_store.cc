#include "engine/spool/file_spool_store.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <system_error>

#include "engine/spool/spool_file.h"

namespace cairn {

Status CheckSpoolWritable(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return FailedPrecondition(
        fmt::format("spool directory {} cannot be created: {}", dir.string(), ec.message()));
  }
  const auto probe = dir / fmt::format(".cairn-check-{}", ::getpid());
  const int fd = ::open(probe.c_str(), O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) {
    return FailedPrecondition(
        fmt::format("spool directory {} is not writable: {}", dir.string(), std::strerror(errno)));
  }
  const char block[4096] = {};
  const bool written = ::write(fd, block, sizeof block) == static_cast<ssize_t>(sizeof block) &&
                       ::fdatasync(fd) == 0;
  const int err = errno;
  ::close(fd);
  std::filesystem::remove(probe, ec);
  if (!written) {
    return FailedPrecondition(fmt::format("spool directory {} does not take a synced write: {}",
                                          dir.string(), std::strerror(err)));
  }
  return OkStatus();
}

std::filesystem::path FileSpoolStore::PathOf(const std::string& volume, uint64_t seq) const {
  return dir_ / volume / fmt::format("{}.spool", seq);
}

Status FileSpoolStore::AddVolume(const std::string& volume) {
  const std::filesystem::path vdir = dir_ / volume;
  std::error_code ec;
  std::filesystem::create_directories(vdir, ec);
  if (ec) {
    return FailedPrecondition(
        fmt::format("cannot create spool directory {}: {}", vdir.string(), ec.message()));
  }
  return OkStatus();
}

StatusOr<std::unique_ptr<SpoolWriter>> FileSpoolStore::Create(const std::string& volume,
                                                              uint64_t seq,
                                                              const SpoolOptions& options) {
  RETURN_IF_ERROR(spool_internal::CheckCreateArgs(SpoolIdentity{volume, seq}, options));
  RETURN_IF_ERROR(AddVolume(volume));
  return SpoolWriter::Create(PathOf(volume, seq), SpoolIdentity{volume, seq}, options);
}

StatusOr<std::unique_ptr<SpoolWriter>> FileSpoolStore::Resume(const std::string& volume,
                                                              uint64_t seq, uint64_t logical_end,
                                                              const SpoolOptions& options) {
  return SpoolWriter::Resume(PathOf(volume, seq), logical_end, options);
}

StatusOr<std::unique_ptr<SpoolReader>> FileSpoolStore::Open(const std::string& volume,
                                                            uint64_t seq) {
  return SpoolReader::Open(PathOf(volume, seq), SpoolIdentity{volume, seq});
}

StatusOr<std::vector<uint64_t>> FileSpoolStore::List(const std::string& volume) {
  std::vector<uint64_t> seqs;
  std::error_code ec;
  std::filesystem::directory_iterator it(dir_ / volume, ec);
  if (ec == std::errc::no_such_file_or_directory) return seqs;
  if (ec) {
    return spool_internal::SpoolErrno(
        ec.value(), fmt::format("listing spool directory {}", (dir_ / volume).string()));
  }
  for (const auto& entry : it) {
    const auto name = entry.path().filename().string();
    if (!name.ends_with(".spool")) continue;
    uint64_t seq = 0;
    const std::string stem = name.substr(0, name.size() - 6);
    auto [end, perr] = std::from_chars(stem.data(), stem.data() + stem.size(), seq);
    if (perr != std::errc() || end != stem.data() + stem.size() || seq == 0) continue;
    seqs.push_back(seq);
  }
  std::sort(seqs.begin(), seqs.end());
  return seqs;
}

StatusOr<std::vector<std::string>> FileSpoolStore::Volumes() {
  std::vector<std::string> volumes;
  std::error_code ec;
  std::filesystem::directory_iterator it(dir_, ec);
  if (ec == std::errc::no_such_file_or_directory) return volumes;
  if (ec) {
    return spool_internal::SpoolErrno(ec.value(),
                                      fmt::format("listing spool directory {}", dir_.string()));
  }
  for (const auto& d : it) {
    std::error_code ec2;
    if (!d.is_directory(ec2)) continue;
    const std::string volume = d.path().filename().string();
    auto seqs = List(volume);
    if (seqs.ok() && !seqs->empty()) volumes.push_back(volume);
  }
  std::sort(volumes.begin(), volumes.end());
  return volumes;
}

Status FileSpoolStore::Remove(const std::string& volume, uint64_t seq) {
  std::error_code ec;
  std::filesystem::remove(PathOf(volume, seq), ec);
  if (ec) {
    return spool_internal::SpoolErrno(
        ec.value(), fmt::format("removing spool {}", PathOf(volume, seq).string()));
  }
  return OkStatus();
}

uint64_t FileSpoolStore::FreeBytes() {
  // Not made yet: the file system it will be made on.
  std::filesystem::path at = dir_;
  struct statvfs sv {};
  while (::statvfs(at.c_str(), &sv) != 0) {
    if (errno != ENOENT || !at.has_relative_path()) return 0;
    at = at.parent_path();
  }
  return static_cast<uint64_t>(sv.f_bavail) * sv.f_frsize;
}

Status FileSpoolStore::CheckWritable(const std::string& volume) {
  return CheckSpoolWritable(volume.empty() ? dir_ : dir_ / volume);
}

}  // namespace cairn
