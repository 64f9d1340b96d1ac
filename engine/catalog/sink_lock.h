// SinkLock: the lock a running sink holds on the catalog of each of its
// pools. It is what a starting sink fences (FenceAndRegisterSink): the
// cluster, not the client, records who holds it (the address of the
// connection that took it), so a holder is always a client that took the
// lock itself. A writer to the pool can forge any catalog record, but it
// cannot make a sink blocklist anybody but itself.
//
// On site B it is a RADOS exclusive lock on the catalog object
// (engine/ceph/rados_sink_lock.h); in tests, MemorySinkLock.
//
// Thread-safety: implementations are safe to call from several threads.
#pragma once

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/base/status.h"

namespace cairn {

struct SinkLockHolder {
  std::string client;  // its entity, e.g. "client.4141"
  std::string cookie;
  std::string addr;  // its client address, e.g. "127.0.0.1:0/3381669821"
  friend bool operator==(const SinkLockHolder&, const SinkLockHolder&) = default;
};

class SinkLock {
 public:
  virtual ~SinkLock() = default;
  // Who holds the lock now (empty if nobody).
  virtual StatusOr<std::vector<SinkLockHolder>> Holders() = 0;
  // Takes the lock for this connection; OK if it holds it already,
  // kAborted, taking nothing, if another holds it.
  virtual Status Take() = 0;
  // Breaks `holder`'s hold; OK if it holds it no more.
  virtual Status Break(const SinkLockHolder& holder) = 0;
  // Gives the lock up (a clean stop); OK if this connection did not hold it.
  virtual Status Release() = 0;
  // This connection's address, as Holders lists it.
  virtual const std::string& self_addr() const = 0;
};

// The lock of one catalog in memory, shared by the handles of several
// clients (one MemorySinkLock each).
struct MemorySinkLockState {
  std::mutex mu;
  std::vector<SinkLockHolder> holders;
};

class MemorySinkLock final : public SinkLock {
 public:
  MemorySinkLock(std::shared_ptr<MemorySinkLockState> state, std::string addr)
      : state_(std::move(state)), self_{"client." + addr, "cookie", std::move(addr)} {}

  StatusOr<std::vector<SinkLockHolder>> Holders() override {
    std::lock_guard lock(state_->mu);
    return state_->holders;
  }
  Status Take() override {
    std::lock_guard lock(state_->mu);
    auto& h = state_->holders;
    if (std::find(h.begin(), h.end(), self_) != h.end()) return OkStatus();
    if (!h.empty()) return Aborted("the sink lock is held by " + h.front().addr);
    h.push_back(self_);
    return OkStatus();
  }
  Status Break(const SinkLockHolder& holder) override {
    std::lock_guard lock(state_->mu);
    std::erase(state_->holders, holder);
    return OkStatus();
  }
  Status Release() override { return Break(self_); }
  const std::string& self_addr() const override { return self_.addr; }

 private:
  std::shared_ptr<MemorySinkLockState> state_;
  const SinkLockHolder self_;
};

}  // namespace cairn
