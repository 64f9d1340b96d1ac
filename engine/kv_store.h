// KvStore: the small, durable, transactional key-value map that holds
// Cairn's catalog (restore points, cursors). On site B it is the omap of one
// RADOS object per pool (engine/rados_kv_store.h), so any replicator node
// can take over; in tests it is a map in memory (MemoryKvStore).
//
// Thread-safety: implementations are safe to call from several threads.
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "engine/status.h"

namespace cairn {

class KvStore {
 public:
  virtual ~KvStore() = default;
  // Sets all of `set` and removes all of `remove` atomically: after a crash
  // either all of it is visible or none of it.
  virtual Status Commit(const std::map<std::string, std::string>& set,
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
