// MemorySpoolStore: the in-memory twin of FileSpoolStore. Each spool is the
// very bytes its file would hold (spool.h: the header block, the frames,
// zeros to a 4 KiB boundary after each Sync), read back by the same reader,
// so the twin fails where the file store fails, with the same texts (paths
// are <dir>/<volume>/<seq>.spool, `dir` given at construction).
//
// Durability as on a disk: each spool keeps what its writer has written
// and, apart, what was last synced (Sync or SyncWritten). DropUnsynced()
// is a crash: every spool goes back to its last synced bytes, and a spool
// never synced is gone. Remove is durable at once.
//
// Thread-safety: thread-safe; its writers and readers are used by one
// thread at a time, and may outlive the store (they hold their spool).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "engine/spool/spool_store.h"

namespace cairn {

namespace spool_internal {
struct MemorySpool;  // one spool's bytes, shared with its writers and readers
}  // namespace spool_internal

class MemorySpoolStore final : public SpoolStore {
 public:
  // `capacity`: what FreeBytes counts down from (bytes held by all spools).
  explicit MemorySpoolStore(std::filesystem::path dir = "/memory/spool",
                            uint64_t capacity = uint64_t{1} << 40);
  ~MemorySpoolStore() override;

  // Always OK: a volume's place is its name.
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
  uint64_t FreeBytes() override;
  // Always OK: memory takes writes.
  Status CheckWritable(const std::string& volume) override;
  std::string where() const override { return dir_.string(); }

  // A simulated crash: every spool loses what was not synced (see above).
  // Writers open at the time write on into spools no longer listed.
  void DropUnsynced();

  // The bytes of a spool as written (synced or not), "" if there is none:
  // for tests that corrupt or inspect a spool.
  std::string Contents(const std::string& volume, uint64_t seq) const;
  // Replaces a spool's bytes, written and synced alike (a test's damage).
  void SetContents(const std::string& volume, uint64_t seq, std::string bytes);

 private:
  using Key = std::pair<std::string, uint64_t>;
  std::filesystem::path PathOf(const std::string& volume, uint64_t seq) const;

  const std::filesystem::path dir_;
  const uint64_t capacity_;
  mutable std::mutex mu_;
  std::map<Key, std::shared_ptr<spool_internal::MemorySpool>> spools_;
};

}  // namespace cairn
