// FileSpoolStore: the Spool seam over a directory, one file per spool at
// <dir>/<volume>/<seq>.spool, written with io_uring and O_DIRECT
// (SpoolWriter::Create; spool.h has the file layout).
//
// Thread-safety: thread-safe (the file system orders what it does); the
// writers and readers are used by one thread at a time.
#pragma once

#include <filesystem>
#include <string>

#include "engine/spool/spool_store.h"

namespace cairn {

// A directory the sink can spool into: created if missing, and a 4 KiB
// file written, fdatasync'ed and removed in it. FailedPrecondition saying
// what is wrong otherwise.
Status CheckSpoolWritable(const std::filesystem::path& dir);

class FileSpoolStore final : public SpoolStore {
 public:
  // `dir` need not exist yet: Create and CheckWritable make it.
  explicit FileSpoolStore(std::filesystem::path dir) : dir_(std::move(dir)) {}

  // The file of a spool: <dir>/<volume>/<seq>.spool.
  std::filesystem::path PathOf(const std::string& volume, uint64_t seq) const;

  Status AddVolume(const std::string& volume) override;
  StatusOr<std::unique_ptr<SpoolWriter>> Create(const std::string& volume, uint64_t seq,
                                                const SpoolOptions& options) override;
  StatusOr<std::unique_ptr<SpoolWriter>> Resume(const std::string& volume, uint64_t seq,
                                                uint64_t logical_end,
                                                const SpoolOptions& options) override;
  StatusOr<std::unique_ptr<SpoolReader>> Open(const std::string& volume, uint64_t seq) override;
  StatusOr<std::vector<uint64_t>> List(const std::string& volume) override;
  StatusOr<std::vector<std::string>> Volumes() override;
  Status Remove(const std::string& volume, uint64_t seq) override;
  // statvfs of the directory (of its nearest existing parent while it is
  // not made): what an unprivileged writer may still use.
  uint64_t FreeBytes() override;
  Status CheckWritable(const std::string& volume) override;
  std::string where() const override { return dir_.string(); }

 private:
  const std::filesystem::path dir_;
};

}  // namespace cairn
