#include "engine/spool/memory_spool_store.h"

#include <fmt/format.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>

#include "engine/spool/spool_file.h"

namespace cairn {

using namespace spool_internal;  // the file's layout (spool_file.h)

namespace spool_internal {

struct MemorySpool {
  std::mutex mu;
  std::string written;       // what the file holds now, synced or not
  std::string synced;        // what a crash leaves
  bool ever_synced = false;  // else a crash leaves no file at all
};

}  // namespace spool_internal

namespace {

// A SpoolWriter into a MemorySpool, byte for byte what UringSpoolWriter
// puts in its file: frames after the header block, and after each Sync
// zeros to a 4 KiB boundary (the next Append overwrites them).
class MemorySpoolWriter final : public SpoolWriter {
 public:
  MemorySpoolWriter(std::shared_ptr<MemorySpool> spool, std::filesystem::path path,
                    uint64_t max_bytes, uint64_t appended)
      : spool_(std::move(spool)),
        path_(std::move(path)),
        max_bytes_(max_bytes),
        appended_(appended) {}

  Status Append(std::span<const char> header, std::string_view body,
                std::span<const char> payload) override {
    assert(header.size() == kFrameHeaderSize);
    assert(GetLE<uint32_t>(header.data() + 8) == body.size());
    assert(GetLE<uint32_t>(header.data() + 12) == payload.size());
    const uint64_t n = header.size() + body.size() + payload.size();
    RETURN_IF_ERROR(CheckSpoolQuota(path_, appended_, n, max_bytes_));
    std::lock_guard lock(spool_->mu);
    std::string& w = spool_->written;
    w.resize(kSpoolHeaderSize + appended_);  // drops the padding of the last Sync
    w.append(header.data(), header.size());
    w.append(body);
    w.append(payload.data(), payload.size());
    appended_ += n;
    return OkStatus();
  }

  StatusOr<uint64_t> Sync() override {
    std::lock_guard lock(spool_->mu);
    std::string& w = spool_->written;
    w.resize(kSpoolHeaderSize + appended_);
    w.resize(RoundUp(w.size(), kAlign), '\0');
    spool_->synced = w;
    spool_->ever_synced = true;
    return appended_;
  }

  Status SyncWritten() override {
    std::lock_guard lock(spool_->mu);
    spool_->synced = spool_->written;
    spool_->ever_synced = true;
    return OkStatus();
  }

  uint64_t appended() const override { return appended_; }

 private:
  const std::shared_ptr<MemorySpool> spool_;
  const std::filesystem::path path_;
  const uint64_t max_bytes_;
  uint64_t appended_;
};

// Reads a MemorySpool as pread reads a file: what is written now.
SpoolReadAt MemoryReadAt(std::shared_ptr<MemorySpool> spool) {
  return [spool = std::move(spool)](char* out, size_t n, uint64_t off) -> StatusOr<size_t> {
    std::lock_guard lock(spool->mu);
    const std::string& w = spool->written;
    if (off >= w.size()) return size_t{0};
    const size_t k = std::min<uint64_t>(n, w.size() - off);
    std::memcpy(out, w.data() + off, k);
    return k;
  };
}

}  // namespace

MemorySpoolStore::MemorySpoolStore(std::filesystem::path dir, uint64_t capacity)
    : dir_(std::move(dir)), capacity_(capacity) {}

MemorySpoolStore::~MemorySpoolStore() = default;

std::filesystem::path MemorySpoolStore::PathOf(const std::string& volume, uint64_t seq) const {
  return dir_ / volume / fmt::format("{}.spool", seq);
}

StatusOr<std::unique_ptr<SpoolWriter>> MemorySpoolStore::Create(const std::string& volume,
                                                                uint64_t seq,
                                                                const SpoolOptions& options) {
  const SpoolIdentity id{volume, seq};
  RETURN_IF_ERROR(CheckCreateArgs(id, options));
  std::shared_ptr<MemorySpool> spool;
  {
    std::lock_guard lock(mu_);
    auto& slot = spools_[Key(volume, seq)];
    if (!slot) slot = std::make_shared<MemorySpool>();
    spool = slot;
  }
  {
    // O_TRUNC: the same file, emptied; what was synced stays until a Sync.
    std::lock_guard lock(spool->mu);
    spool->written.assign(kSpoolHeaderSize, '\0');
    EncodeSpoolHeader(id, spool->written.data());
  }
  return std::unique_ptr<SpoolWriter>(
      new MemorySpoolWriter(std::move(spool), PathOf(volume, seq), options.max_bytes, 0));
}

StatusOr<std::unique_ptr<SpoolWriter>> MemorySpoolStore::Resume(const std::string& volume,
                                                                uint64_t seq, uint64_t logical_end,
                                                                const SpoolOptions& options) {
  RETURN_IF_ERROR(CheckResumeArgs(options));
  const std::filesystem::path path = PathOf(volume, seq);
  std::shared_ptr<MemorySpool> spool;
  {
    std::lock_guard lock(mu_);
    if (auto it = spools_.find(Key(volume, seq)); it != spools_.end()) spool = it->second;
  }
  if (!spool) {
    return FailedPrecondition(fmt::format("spool directory missing: {} (re-opening spool {}: {})",
                                          DirOf(path), path.string(), std::strerror(ENOENT)));
  }
  std::lock_guard lock(spool->mu);
  const uint64_t end = kSpoolHeaderSize + logical_end;
  if (end % kAlign != 0 && spool->written.size() < end) {
    return DataLoss(
        fmt::format("spool {} is shorter than its resume point {}", path.string(), logical_end));
  }
  spool->written.resize(RoundUp(end, kAlign), '\0');  // ftruncate
  return std::unique_ptr<SpoolWriter>(
      new MemorySpoolWriter(spool, path, options.max_bytes, logical_end));
}

StatusOr<std::unique_ptr<SpoolReader>> MemorySpoolStore::Open(const std::string& volume,
                                                              uint64_t seq) {
  const std::filesystem::path path = PathOf(volume, seq);
  std::shared_ptr<MemorySpool> spool;
  {
    std::lock_guard lock(mu_);
    if (auto it = spools_.find(Key(volume, seq)); it != spools_.end()) spool = it->second;
  }
  if (!spool) return SpoolErrno(ENOENT, fmt::format("opening spool {}", path.string()));
  return OpenSpoolBytes(MemoryReadAt(std::move(spool)), path, SpoolIdentity{volume, seq});
}

StatusOr<std::vector<uint64_t>> MemorySpoolStore::List(const std::string& volume) {
  std::lock_guard lock(mu_);
  std::vector<uint64_t> seqs;
  for (auto it = spools_.lower_bound(Key(volume, 0));
       it != spools_.end() && it->first.first == volume; ++it) {
    if (it->first.second != 0) seqs.push_back(it->first.second);
  }
  return seqs;
}

StatusOr<std::vector<std::string>> MemorySpoolStore::Volumes() {
  std::lock_guard lock(mu_);
  std::vector<std::string> volumes;
  for (const auto& [key, spool] : spools_) {
    if (key.second != 0 && (volumes.empty() || volumes.back() != key.first)) {
      volumes.push_back(key.first);
    }
  }
  return volumes;
}

Status MemorySpoolStore::Remove(const std::string& volume, uint64_t seq) {
  std::lock_guard lock(mu_);
  spools_.erase(Key(volume, seq));
  return OkStatus();
}

uint64_t MemorySpoolStore::FreeBytes() {
  std::lock_guard lock(mu_);
  uint64_t used = 0;
  for (const auto& [key, spool] : spools_) {
    std::lock_guard slock(spool->mu);
    used += spool->written.size();
  }
  return used >= capacity_ ? 0 : capacity_ - used;
}

Status MemorySpoolStore::CheckWritable(const std::string&) { return OkStatus(); }

Status MemorySpoolStore::AddVolume(const std::string&) { return OkStatus(); }

void MemorySpoolStore::DropUnsynced() {
  std::lock_guard lock(mu_);
  for (auto it = spools_.begin(); it != spools_.end();) {
    const std::shared_ptr<MemorySpool> old = it->second;  // outlives its lock
    std::lock_guard slock(old->mu);
    if (!old->ever_synced) {
      it = spools_.erase(it);
      continue;
    }
    // A new spool: writers of the crashed process write on into the old.
    auto fresh = std::make_shared<MemorySpool>();
    fresh->written = fresh->synced = old->synced;
    fresh->ever_synced = true;
    it->second = std::move(fresh);
    ++it;
  }
}

std::string MemorySpoolStore::Contents(const std::string& volume, uint64_t seq) const {
  std::lock_guard lock(mu_);
  auto it = spools_.find(Key(volume, seq));
  if (it == spools_.end()) return "";
  std::lock_guard slock(it->second->mu);
  return it->second->written;
}

void MemorySpoolStore::SetContents(const std::string& volume, uint64_t seq, std::string bytes) {
  std::lock_guard lock(mu_);
  auto& slot = spools_[Key(volume, seq)];
  if (!slot) slot = std::make_shared<MemorySpool>();
  std::lock_guard slock(slot->mu);
  slot->synced = bytes;
  slot->written = std::move(bytes);
  slot->ever_synced = true;
}

}  // namespace cairn
