// KvStore: the small, durable, transactional key-value map that holds
// Cairn's catalog (restore points, cursors). On site B it is the omap of one
// RADOS object per pool (engine/ceph/rados_kv_store.h), so any replicator node
// can take over; in tests it is a map in memory (MemoryKvStore).
//
// Thread-safety: implementations are safe to call from several threads.
#pragma once

#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "engine/base/status.h"

namespace cairn {

class KvStore {
 public:
  virtual ~KvStore() = default;
  // Sets all of `set` and removes all of `remove` atomically: after a crash
  // either all of it is visible or none of it.
  virtual Status Commit(const std::map<std::string, std::string>& set,
                        const std::vector<std::string>& remove) = 0;
  // Commit, but only if `key` holds `expected` now (nullopt: `key` is
  // absent), checked and applied atomically: kAborted, changing nothing, if
  // it does not. A key holding the empty value counts as absent (RADOS
  // compares a missing omap key as empty), so `expected` is never "".
  virtual Status CommitIf(const std::string& key, const std::optional<std::string>& expected,
                          const std::map<std::string, std::string>& set,
                          const std::vector<std::string>& remove) = 0;
  // All pairs whose key starts with `prefix`, in key order.
  virtual StatusOr<std::map<std::string, std::string>> Scan(const std::string& prefix) = 0;
  // kNotFound if absent.
  virtual StatusOr<std::string> Get(const std::string& key) = 0;
};

class MemoryKvStore final : public KvStore {
 public:
  Status Commit(const std::map<std::string, std::string>& set,
                const std::vector<std::string>& remove) override {
    std::lock_guard lock(mu_);
    for (const auto& [k, v] : set) m_[k] = v;
    for (const auto& k : remove) m_.erase(k);
    return OkStatus();
  }
  Status CommitIf(const std::string& key, const std::optional<std::string>& expected,
                  const std::map<std::string, std::string>& set,
                  const std::vector<std::string>& remove) override {
    if (expected && expected->empty()) {
      return InvalidArgument("CommitIf of key " + key + ": an expected value must not be empty");
    }
    std::lock_guard lock(mu_);
    auto it = m_.find(key);
    const bool absent = it == m_.end() || it->second.empty();
    if (expected ? absent || it->second != *expected : !absent) {
      return Aborted("key " + key + " no longer holds the value expected");
    }
    for (const auto& [k, v] : set) m_[k] = v;
    for (const auto& k : remove) m_.erase(k);
    return OkStatus();
  }
  StatusOr<std::map<std::string, std::string>> Scan(const std::string& prefix) override {
    std::lock_guard lock(mu_);
    std::map<std::string, std::string> out;
    for (auto it = m_.lower_bound(prefix); it != m_.end() && it->first.starts_with(prefix); ++it) {
      out.insert(*it);
    }
    return out;
  }
  StatusOr<std::string> Get(const std::string& key) override {
    std::lock_guard lock(mu_);
    auto it = m_.find(key);
    if (it == m_.end()) return NotFound("no key " + key);
    return it->second;
  }

 private:
  std::mutex mu_;
  std::map<std::string, std::string> m_;
};

}  // namespace cairn
